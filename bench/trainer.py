"""Training throughput of Ablate's trainer in each of its modes against a naive eager PyTorch loop, in the
same run, with what the machine offers for bf16.

What it measures, per depth (default ResNet-20 and ResNet-110, original unit), on CIFAR-shaped synthetic
data (3×32×32, 10 classes, batch 128, pad-4 crop + flip augmentation, SGD momentum 0.9):

- ablate, one line per mode: `workers.trainer.run_trial`, the product itself, called for real, with its
  precision and compile decision set: `fp32` (eager), `bf16` (autocast), `fp32+compile`, `bf16+compile`.
  Its log records carry `img_per_s` for the window since the previous one (it evaluates only at the end,
  after the last window closes); the first window is warm-up (allocator, oneDNN primitive caches, and
  for compiled modes the compilation, reported as `first window s`) and is discarded.
- naive: what a typical user writes: a `DataLoader` (num_workers=0: two cores) over a Dataset of float
  NCHW tensors with per-sample `torchvision.transforms.v2` RandomCrop(32, padding=4) and
  RandomHorizontalFlip, the same model in the default NCHW layout, fp32 eager, `loss.item()` every step.
  Same warm-up and window sizes, timed with `time.perf_counter`.
- auto: the mode `precision: auto` and the compile rule pick on this machine for a paper-length trial
  (`resolve_precision`, `should_compile` on the paper-cifar recipe): the headline `ratio=`.
- machine: the CPU's bf16 units as it reports them (AMX, AVX-512 BF16), and the best 2048² matmul
  GFLOP/s in fp32 and in bf16, measured at the start and at the end of the run.

Throughput is the median of the measured windows of each loop; the loops alternate (A B A B with the
default two rounds) so that drift (thermal, a noisy neighbour) hits both. Slow modes are measured only at
the first depth (on CPUs without bf16 units bf16 is emulated, about 10× slower: `--modes` picks).

Run from the repository root (about 5 minutes on 2 cores; `--quick` is a smoke run of seconds):

    .venv/bin/python bench/trainer.py
    .venv/bin/python bench/trainer.py --depths 20 --rounds 3 --windows 20:4 --modes fp32,bf16
    .venv/bin/python bench/trainer.py --quick

The last line is `key=value` pairs; `ratio=` is the auto mode's img/s over the naive loop's at ResNet-20
(>1 is better), `ratio_<mode>_rN=` each mode's at depth N.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `import ablations` needs the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ablations import build_model, count_macs  # noqa: E402
from workers.recipes import resolve_recipe  # noqa: E402
from workers.trainer import cpu_flags, resolve_precision, run_trial, should_compile, trial_config  # noqa: E402

BATCH = 128
DATASET = "synthetic"
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4
# run_trial evaluates at every window boundary; holding out 2% (100 images) as a validation split makes it
# evaluate those instead of the 1000 test images: that time is excluded from img/s but not from wall time.
VALIDATION = 0.02
# Iterations per window by depth: on 2 cores ResNet-110 runs 40-60 img/s (2-3 s a step), ResNet-20 ~6× faster.
DEFAULT_WINDOW = {20: 8, 110: 3}
QUICK_WINDOW = {20: 2, 110: 1}
# mode → (precision, compile)
MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp32+compile": ("fp32", True),
         "bf16+compile": ("bf16", True)}


def window_for(depth: int, table: dict[int, int]) -> int:
    """Window length for any depth: scale the ResNet-20 figure by 20/depth (time per step ∝ depth)."""
    return table.get(depth, max(1, round(table[20] * 20 / depth)))


# --- contention ------------------------------------------------------------------------------------------
def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes were busy, CPU seconds this process used) so far; None off Linux.

    Their difference over the run is what other processes took: on a shared 2-core machine that is the
    main source of noise (an OpenMP barrier waits for a descheduled thread), so the report shows it."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    usage = os.times()
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), usage.user + usage.system


def wait_quiet(max_wait: float, threshold: float = 0.10) -> float:
    """Wait (up to max_wait s) until other processes use under `threshold` of the CPUs over one second;
    returns the seconds waited. Called between loops, when this process itself is idle."""
    start = time.perf_counter()
    while True:
        a = busy_seconds()
        time.sleep(1.0)
        b = busy_seconds()
        waited = time.perf_counter() - start
        if a is None or b is None or (b[0] - a[0]) / (os.cpu_count() or 1) < threshold or waited >= max_wait:
            return waited


# --- peak ------------------------------------------------------------------------------------------------
def matmul_peak(n: int = 2048, dtype: torch.dtype = torch.float32, budget_s: float = 3.0) -> float:
    """Best-of n×n @ n×n GFLOP/s in `dtype` over about `budget_s` seconds (at least 3 products): the attainable
    dense-compute ceiling with the current threads. bf16 without hardware support is emulated and can be
    two orders slower, hence a time budget rather than a count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: MKL/oneDNN thread pool, page faults on the output, clock ramp-up
    best, start, reps = 0.0, time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - start < budget_s:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
        reps += 1
    return best


def auto_mode() -> str:
    """The mode a paper-length trial takes here: `precision: auto` resolved, and the compile rule."""
    precision = resolve_precision("auto", torch.device("cpu"))
    recipe = resolve_recipe("paper-cifar")
    macs = count_macs(build_model(depth=20, unit="original"), 32)
    return precision + ("+compile" if should_compile(None, torch.device("cpu"), macs, recipe) else "")


# --- ablate ----------------------------------------------------------------------------------------------
def ablate_windows(depth: int, window: int, windows: int, threads: int, mode: str) -> tuple[list[float], float]:
    """img/s of each measured window of one real `run_trial` in `mode`, window 0 (warm-up) dropped; and the
    seconds to the end of window 0 (compilation included)."""
    precision, compiled = MODES[mode]
    iterations = window * (windows + 1)
    recipe = resolve_recipe("smoke", dict(iterations=iterations, batch_size=BATCH, augment=True, lr=LR,
                                          momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, milestones=(),
                                          warmup_iterations=0, log_every=window, eval_every=iterations,
                                          checkpoint_every=iterations, precision=precision))
    config = trial_config({"depth": depth, "unit": "original"}, DATASET, recipe, seed=0, validation=VALIDATION)
    history = run_trial(config, threads=threads, device="cpu", compile_model=compiled)["history"]
    rates = [h["img_per_s"] for h in history if "img_per_s" in h]  # log points (live points are sink-only)
    if len(rates) != windows + 1:
        raise RuntimeError(f"expected {windows + 1} log records from run_trial, got {len(rates)}")
    return rates[1:], window * BATCH / rates[0]


# --- naive -----------------------------------------------------------------------------------------------
class AugmentedTensors(torch.utils.data.Dataset):
    """Float NCHW images with per-sample torchvision augmentation, as in the CIFAR tutorials."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        from torchvision.transforms import v2
        self.x, self.y = x, y
        self.transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


def naive_windows(depth: int, window: int, windows: int, threads: int, data) -> list[float]:
    """img/s of each measured window of a plain eager loop; the first window (warm-up) is dropped."""
    torch.set_num_threads(threads)
    # Normalised once up front, like a dataset of float tensors (the per-pixel mean, as the trainer does).
    x = data.train.x.float() - data.mean
    x = x / x[:10_000].std()
    loader = torch.utils.data.DataLoader(AugmentedTensors(x, data.train.y.long()), batch_size=BATCH,
                                         shuffle=True, drop_last=True, num_workers=0)
    torch.manual_seed(0)
    model = build_model(depth=depth, unit="original", in_channels=3, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    rates, step, total = [], 0, window * (windows + 1)
    t0 = time.perf_counter()
    while step < total:
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the usual per-step logging sync
            step += 1
            if step % window == 0:
                t1 = time.perf_counter()
                rates.append(window * BATCH / (t1 - t0))
                t0 = t1
            if step == total:
                break
    return rates[1:]


# --- report ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default=None, help="comma-separated depths (default 20,110; --quick: 20)")
    ap.add_argument("--windows", default=None,
                    help="iterations per timing window, DEPTH:N pairs, e.g. 20:8,110:3 (one warm-up window "
                         "plus --measured windows per round)")
    ap.add_argument("--measured", type=int, default=None, help="measured windows per loop per round (default 3)")
    ap.add_argument("--rounds", type=int, default=None, help="A B rounds per depth (default 2; --quick: 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: cores)")
    ap.add_argument("--modes", default=None,
                    help=f"Ablate's modes to measure at the first depth, from {', '.join(MODES)} (default: all); "
                         "later depths measure fp32 and the auto mode")
    ap.add_argument("--settle", type=float, default=None,
                    help="before each loop, wait up to this many seconds for a quiet machine (default 60; "
                         "--quick: 0); waiting is reported, and the wall time includes it")
    ap.add_argument("--quick", action="store_true", help="smoke run: ResNet-20, tiny windows, one round")
    args = ap.parse_args(argv)

    quick = args.quick
    depths = [int(d) for d in (args.depths or ("20" if quick else "20,110")).split(",")]
    table = dict(QUICK_WINDOW if quick else DEFAULT_WINDOW)
    if args.windows:
        table.update({int(k): int(v) for k, v in (p.split(":") for p in args.windows.split(","))})
    measured = args.measured or (1 if quick else 3)
    rounds = args.rounds or (1 if quick else 2)
    threads = args.threads
    modes = [m.strip() for m in (args.modes or ",".join(MODES)).split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode {unknown[0]!r}; choose from {', '.join(MODES)}")
    if args.settle is None:
        args.settle = 0.0 if quick else 60.0

    # The trainer's float(loss) on a tensor that requires grad warns once per trial; it is harmless here.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    from workers.data import load_dataset  # deferred: only the naive loop needs the arrays themselves
    data = load_dataset(DATASET, validation=VALIDATION)  # the same training split as run_trial

    wall, busy = time.perf_counter(), busy_seconds()
    torch.set_num_threads(threads)
    units = sorted({"amx_bf16", "amx_tile", "avx512_bf16", "avx512f"} & cpu_flags())
    peaks = {"fp32": [matmul_peak()], "bf16": [matmul_peak(1024, torch.bfloat16)]}
    auto = auto_mode()
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, bf16-relevant flags: {', '.join(units) or 'none'}; "
          f"matmul peak fp32 {peaks['fp32'][0]:.1f}, bf16 {peaks['bf16'][0]:.1f} GFLOP/s ({threads} threads); "
          f"auto mode here: {auto}", flush=True)

    results: dict[int, dict[str, Any]] = {}
    for index, depth in enumerate(depths):
        window = window_for(depth, table)
        macs = count_macs(build_model(depth=depth, unit="original"), 32)
        here = modes if index == 0 else sorted({"fp32", auto}, key=list(MODES).index)
        rates: dict[str, list[float]] = {m: [] for m in [*here, "naive"]}
        first: dict[str, list[float]] = {m: [] for m in here}
        for r in range(rounds):
            # Alternate the order, so no loop always runs on a cooler (or warmer) machine.
            order = [*here, "naive"] if r % 2 == 0 else ["naive", *reversed(here)]
            for which in order:
                if args.settle > 0 and (waited := wait_quiet(args.settle)) > 1.5:
                    print(f"  (waited {waited:.0f} s for other processes to quiet down)", flush=True)
                if which == "naive":
                    rates["naive"] += naive_windows(depth, window, measured, threads, data)
                else:
                    got, warm = ablate_windows(depth, window, measured, threads, which)
                    rates[which] += got
                    first[which].append(warm)
            print(f"  resnet-{depth} round {r + 1}/{rounds}: " + ", ".join(
                f"{m} {[round(v) for v in rates[m][-measured:]]}" for m in rates) + " img/s", flush=True)
        results[depth] = {"macs": macs, "rates": {m: statistics.median(v) for m, v in rates.items()},
                          "first": {m: statistics.median(v) for m, v in first.items()}}

    peaks["fp32"].append(matmul_peak())
    peaks["bf16"].append(matmul_peak(1024, torch.bfloat16))
    peak = {k: max(v) for k, v in peaks.items()}  # the ceiling: the better of the two, so drift does not flatter
    wall = time.perf_counter() - wall
    busy_end = busy_seconds()
    # Share of the machine's CPU time that other processes took during the run: above ~0.05 the figures
    # are disturbed (the ratio less so, since the loops alternate), and the run is worth repeating.
    others = (max(0.0, (busy_end[0] - busy[0]) - (busy_end[1] - busy[1])) / (wall * (os.cpu_count() or 1))
              if busy and busy_end else float("nan"))

    print(f"\nmatmul peak fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s; batch {BATCH}, "
          f"{threads} threads, wall {wall:.0f} s")
    print(f"other processes used {100 * others:.0f}% of the machine's CPU time during the run"
          + ("  <- noisy: rerun on a quiet machine" if others > 0.05 else ""))
    kv = {"bench": "trainer", "ratio": "", "auto": auto}  # the headline second, filled in below
    for depth, res in results.items():
        macs, naive = res["macs"], res["rates"]["naive"]
        print(f"\nResNet-{depth} (original unit), {macs / 1e6:.1f} MMAC/image forward")
        print(f"  {'loop':<21}{'img/s':>9}{'GFLOP/s':>10}{'% peak':>9}{'vs naive':>10}{'first window s':>16}")
        for mode, rate in res["rates"].items():
            flops = rate * 6 * macs / 1e9
            ceiling = peak["bf16" if mode.startswith("bf16") else "fp32"]
            warm = res["first"].get(mode)
            print(f"  {mode + (' (auto)' if mode == auto else ''):<21}{rate:>9.1f}{flops:>10.1f}"
                  f"{100 * flops / ceiling:>8.1f}%{rate / naive:>10.2f}{'' if warm is None else f'{warm:.1f}':>16}")
            if mode != "naive":
                kv[f"ratio_{mode.replace('+', '_')}_r{depth}"] = f"{rate / naive:.3f}"
        if auto in res["rates"] and not kv["ratio"]:
            kv["ratio"] = f"{res['rates'][auto] / naive:.3f}"
        kv[f"naive_img_s_r{depth}"] = f"{naive:.1f}"
        kv[f"auto_img_s_r{depth}"] = f"{res['rates'].get(auto, float('nan')):.1f}"
    kv["peak_gflops_fp32"] = f"{peak['fp32']:.1f}"
    kv["peak_gflops_bf16"] = f"{peak['bf16']:.1f}"
    kv["bf16_units"] = "yes" if {"amx_bf16", "avx512_bf16"} & set(units) else "no"
    kv["threads"] = str(threads)
    kv["wall_s"] = f"{wall:.0f}"
    kv["others_cpu_frac"] = f"{others:.2f}"
    print(" ".join(f"{k}={v}" for k, v in kv.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
