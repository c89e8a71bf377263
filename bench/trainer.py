"""Training throughput of Ablate's trainer against a naive eager PyTorch loop, in the same run.

What it measures, per depth (default ResNet-20 and ResNet-110, original unit), on CIFAR-shaped synthetic
data (3×32×32, 10 classes, batch 128, pad-4 crop + flip augmentation, SGD momentum 0.9):

- ablate: `workers.trainer.run_trial`, the product itself, called for real. Its log records carry
  `img_per_s` for the window since the previous one (it evaluates only at the end, after the last
  window closes); the first window is warm-up (allocator, oneDNN primitive caches) and is discarded, the rest are measured windows.
- naive: what a typical user writes: a `DataLoader` (num_workers=0: two cores) over a Dataset of float
  NCHW tensors with per-sample `torchvision.transforms.v2` RandomCrop(32, padding=4) and
  RandomHorizontalFlip, the same model in the default NCHW layout, eager, `loss.item()` every step.
  Same warm-up and window sizes, timed with `time.perf_counter`.
- peak: the best fp32 2048² matmul GFLOP/s, measured at the start and at the end of the run.

Throughput is the median of the measured windows of each loop; the loops alternate (A B A B with the
default two rounds) so that drift (thermal, a noisy neighbour) hits both. Achieved GFLOP/s is
img/s × 3 × 2 × forward MACs (backward ≈ 2× forward, 2 flops per multiply-accumulate).

Run from the repository root (about 4 minutes on 2 cores; `--quick` is a smoke run of seconds):

    .venv/bin/python bench/trainer.py
    .venv/bin/python bench/trainer.py --depths 20 --rounds 3 --windows 20:4
    .venv/bin/python bench/trainer.py --quick

The last line is `key=value` pairs; `ratio=` is Ablate's img/s over the naive loop's at ResNet-20 (>1 is
better), `ratio_rN=` the same at depth N.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `import ablations` needs the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ablations import build_model, count_macs  # noqa: E402
from workers.recipes import resolve_recipe  # noqa: E402
from workers.sinks import MemorySink  # noqa: E402
from workers.trainer import run_trial, trial_config  # noqa: E402

BATCH = 128
DATASET = "synthetic"
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4
# run_trial evaluates at every window boundary; holding out 2% (100 images) as a validation split makes it
# evaluate those instead of the 1000 test images: that time is excluded from img/s but not from wall time.
VALIDATION = 0.02
# Iterations per window by depth: on 2 cores ResNet-110 runs 40-60 img/s (2-3 s a step), ResNet-20 ~6× faster.
DEFAULT_WINDOW = {20: 8, 110: 3}
QUICK_WINDOW = {20: 2, 110: 1}


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
def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best-of fp32 n×n @ n×n GFLOP/s: the attainable dense-compute ceiling with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):  # warm-up: MKL thread pool, page faults on the output, clock ramp-up
        a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


# --- ablate ----------------------------------------------------------------------------------------------
def ablate_windows(depth: int, window: int, windows: int, threads: int) -> list[float]:
    """img/s of each measured window of one real `run_trial`; window 0 (warm-up) is dropped."""
    iterations = window * (windows + 1)
    recipe = resolve_recipe("smoke", dict(iterations=iterations, batch_size=BATCH, augment=True, lr=LR,
                                          momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, milestones=(),
                                          warmup_iterations=0, log_every=window, eval_every=iterations,
                                          checkpoint_every=iterations))
    config = trial_config({"depth": depth, "unit": "original"}, DATASET, recipe, seed=0, validation=VALIDATION)
    sink = MemorySink()
    run_trial(config, threads=threads, sink=sink, device="cpu")
    rates = [r["img_per_s"] for r in sink.records if "img_per_s" in r]
    if len(rates) != windows + 1:
        raise RuntimeError(f"expected {windows + 1} log records from run_trial, got {len(rates)}")
    return rates[1:]


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
    if args.settle is None:
        args.settle = 0.0 if quick else 60.0

    # The trainer's float(loss) on a tensor that requires grad warns once per trial; it is harmless here.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
    from workers.data import load_dataset  # deferred: only the naive loop needs the arrays themselves
    data = load_dataset(DATASET, validation=VALIDATION)  # the same training split as run_trial

    wall, busy = time.perf_counter(), busy_seconds()
    torch.set_num_threads(threads)
    peaks = [matmul_peak()]
    print(f"fp32 matmul peak: {peaks[0]:.1f} GFLOP/s ({threads} threads, {torch.backends.cpu.get_cpu_capability()})",
          flush=True)

    results = {}
    for depth in depths:
        window = window_for(depth, table)
        macs = count_macs(build_model(depth=depth, unit="original"), 32)
        ab, nv = [], []
        for r in range(rounds):
            # Alternate which loop goes first, so neither always runs on a cooler (or warmer) machine.
            order = ("ablate", "naive") if r % 2 == 0 else ("naive", "ablate")
            for which in order:
                if args.settle > 0 and (waited := wait_quiet(args.settle)) > 1.5:
                    print(f"  (waited {waited:.0f} s for other processes to quiet down)", flush=True)
                if which == "ablate":
                    ab += ablate_windows(depth, window, measured, threads)
                else:
                    nv += naive_windows(depth, window, measured, threads, data)
            print(f"  resnet-{depth} round {r + 1}/{rounds}: ablate {[round(v) for v in ab[-measured:]]} "
                  f"naive {[round(v) for v in nv[-measured:]]} img/s", flush=True)
        results[depth] = (statistics.median(ab), statistics.median(nv), macs)

    peaks.append(matmul_peak())
    peak = max(peaks)  # the ceiling: the better of the two, so drift does not flatter the fractions
    wall = time.perf_counter() - wall
    busy_end = busy_seconds()
    # Share of the machine's CPU time that other processes took during the run: above ~0.05 the figures
    # are disturbed (the ratio less so, since both loops alternate), and the run is worth repeating.
    others = (max(0.0, (busy_end[0] - busy[0]) - (busy_end[1] - busy[1])) / (wall * (os.cpu_count() or 1))
              if busy and busy_end else float("nan"))

    print(f"\nfp32 matmul peak {peak:.1f} GFLOP/s (start {peaks[0]:.1f}, end {peaks[1]:.1f}); batch {BATCH}, "
          f"{threads} threads, wall {wall:.0f} s")
    print(f"other processes used {100 * others:.0f}% of the machine's CPU time during the run"
          + ("  <- noisy: rerun on a quiet machine" if others > 0.05 else ""))
    kv = {"bench": "trainer", "ratio": ""}  # the headline second, filled in below
    for depth, (a, n, macs) in results.items():
        ga, gn = a * 6 * macs / 1e9, n * 6 * macs / 1e9
        print(f"\nResNet-{depth} (original unit), {macs / 1e6:.1f} MMAC/image forward")
        print(f"  {'loop':<8}{'img/s':>9}{'GFLOP/s':>10}{'% peak':>9}")
        print(f"  {'ablate':<8}{a:>9.1f}{ga:>10.1f}{100 * ga / peak:>8.1f}%")
        print(f"  {'naive':<8}{n:>9.1f}{gn:>10.1f}{100 * gn / peak:>8.1f}%")
        print(f"  ratio ablate/naive: {a / n:.2f}")
        suffix = f"r{depth}"
        if depth == 20:
            kv["ratio"] = f"{a / n:.3f}"
        kv[f"ratio_{suffix}"] = f"{a / n:.3f}"
        kv[f"ablate_img_s_{suffix}"] = f"{a:.1f}"
        kv[f"naive_img_s_{suffix}"] = f"{n:.1f}"
        kv[f"ablate_gflops_{suffix}"] = f"{ga:.1f}"
        kv[f"naive_gflops_{suffix}"] = f"{gn:.1f}"
        kv[f"ablate_peak_frac_{suffix}"] = f"{ga / peak:.3f}"
        kv[f"naive_peak_frac_{suffix}"] = f"{gn / peak:.3f}"
    if not kv["ratio"]:  # no ResNet-20 in this run: the first depth is the headline
        kv["ratio"] = kv[f"ratio_r{depths[0]}"]
    kv["peak_gflops"] = f"{peak:.1f}"
    kv["threads"] = str(threads)
    kv["wall_s"] = f"{wall:.0f}"
    kv["others_cpu_frac"] = f"{others:.2f}"
    print(" ".join(f"{k}={v}" for k, v in kv.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
