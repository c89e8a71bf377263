"""Fused multi-seed training against the same seeds trained one after another, in the same run.

What it measures: k seeds of ResNet-20 (original unit) on CIFAR-shaped synthetic data (3×32×32, batch
128, pad-4 crop + flip, SGD momentum 0.9), the same work both ways:

- fused: one `workers.trainer.run_trials` call training the k seeds as channel groups of one network;
- separate: k `workers.trainer.run_trial` calls, one seed each, sequentially.

Both are the product, called for real. Each records `img_per_s` per log window (the one evaluation comes
after the last window; the group's figure is per seed, so the group trains k× that many images); the first window of
every call is warm-up (allocator, oneDNN primitive caches) and is dropped. Throughput is per seed-image:
images of any seed per second, the median of the measured windows. The two loops alternate over rounds
(A B, then B A) so drift hits both.

What to expect on these CPUs (2 cores, fp32): a loss. A ResNet-20 step at batch 128 already keeps both
cores busy in large convolutions (the trainer reaches about 55-60% of the fp32 matmul peak,
shared/NOTES.md), so k× wider layers only trade k dense kernels for one grouped kernel of the same
arithmetic, and oneDNN's grouped convolutions are a little slower per multiply than its dense ones;
meanwhile each layer's activations grow k-fold and fall out of the caches, so BN and ReLU run slower
per element (profiled at k=4: convolutions +7%, BN +18%, ReLU up to +75% per seed). Measured on a quiet
machine, k=4: 0.80 and 0.83. The lever is a GPU: there a batch-128 CIFAR ResNet fills a small fraction
of the chip and is bound by kernel launches, and k seeds per kernel raise occupancy k-fold at the same
launch count (bench/gpu.sh).

Run from the repository root (about a minute on 2 quiet cores; `--quick` is a smoke run of seconds):

    .venv/bin/python bench/fusion.py
    .venv/bin/python bench/fusion.py --seeds 2 --window 3 --measured 4 --rounds 1
    .venv/bin/python bench/fusion.py --quick

The last line is `key=value` pairs; `ratio=` is the fused per-seed-image throughput over the separate
one (>1: fusion wins).
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
if str(ROOT) not in sys.path:  # run as a script from anywhere: `import workers` needs the repo root
    sys.path.insert(0, str(ROOT))

from workers.trainer import run_trials  # noqa: E402
from workers.recipes import resolve_recipe  # noqa: E402
from workers.sinks import MemorySink  # noqa: E402
from workers.trainer import run_trial, trial_config  # noqa: E402

BATCH = 128
DEPTH = 20
# Evaluating 100 held-out images instead of 1000 test images keeps the (excluded) evaluation time short.
VALIDATION = 0.02


def others_cpu_seconds() -> float | None:
    """CPU seconds all other processes have used so far (Linux), to tell a quiet run from a disturbed one:
    on a shared 2-core machine other processes are the main source of noise."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    usage = os.times()
    return busy - usage.user - usage.system - usage.children_user - usage.children_system


def configs(seeds: int, window: int, measured: int):
    iterations = window * (measured + 1)
    recipe = resolve_recipe("smoke", dict(iterations=iterations, batch_size=BATCH, lr=0.05, milestones=(),
                                          warmup_iterations=0, log_every=window, eval_every=iterations,
                                          checkpoint_every=iterations))
    return [trial_config({"depth": DEPTH, "unit": "original"}, "synthetic", recipe, seed, validation=VALIDATION)
            for seed in range(seeds)]


def measured_rates(sink: MemorySink) -> list[float]:
    return [r["img_per_s"] for r in sink.records if "img_per_s" in r][1:]  # window 0 is warm-up


def fused_rates(seeds: int, window: int, measured: int, threads: int) -> list[float]:
    """Seed-images per second of each measured window of one fused run."""
    sinks = [MemorySink() for _ in range(seeds)]
    run_trials(configs(seeds, window, measured), sinks=sinks, device="cpu", threads=threads)
    return [seeds * r for r in measured_rates(sinks[0])]


def separate_rates(seeds: int, window: int, measured: int, threads: int) -> list[float]:
    """Seed-images per second of each measured window of k solo runs, one after another."""
    rates = []
    for config in configs(seeds, window, measured):
        sink = MemorySink()
        run_trial(config, sink=sink, device="cpu", threads=threads)
        rates += measured_rates(sink)
    return rates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="k, the seeds trained together (default 4)")
    ap.add_argument("--window", type=int, default=None, help="iterations per timing window (default 3; --quick: 1)")
    ap.add_argument("--measured", type=int, default=None, help="measured windows per run (default 2; --quick: 1)")
    ap.add_argument("--rounds", type=int, default=None, help="A B rounds (default 2; --quick: 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: cores)")
    ap.add_argument("--quick", action="store_true", help="smoke run: k=2, one-iteration windows, one round")
    args = ap.parse_args(argv)
    k = 2 if args.quick and args.seeds == 4 else args.seeds
    window = args.window or (1 if args.quick else 3)
    measured = args.measured or (1 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 2)
    # The trainer's float(loss) on a tensor that requires grad warns once per trial; harmless here.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")

    wall, others = time.perf_counter(), others_cpu_seconds()
    fused, separate = [], []
    for r in range(rounds):
        order = ("fused", "separate") if r % 2 == 0 else ("separate", "fused")
        for which in order:
            if which == "fused":
                fused += fused_rates(k, window, measured, args.threads)
            else:
                separate += separate_rates(k, window, measured, args.threads)
        print(f"  round {r + 1}/{rounds}: fused {[round(v) for v in fused[-measured:]]} "
              f"separate {[round(v) for v in separate[-k * measured:]]} seed-img/s", flush=True)
    wall = time.perf_counter() - wall
    end = others_cpu_seconds()
    # Share of the machine's CPU time other processes took: above ~0.05 the figures are disturbed.
    share = max(0.0, end - others) / (wall * (os.cpu_count() or 1)) if others is not None else float("nan")
    f, s = statistics.median(fused), statistics.median(separate)
    print(f"\nResNet-{DEPTH} (original unit), batch {BATCH}, {k} seeds, {args.threads} threads, wall {wall:.0f} s")
    print(f"  fused    {f:8.1f} seed-img/s ({f / k:.1f} img/s per seed)")
    print(f"  separate {s:8.1f} seed-img/s")
    print(f"  ratio fused/separate: {f / s:.2f}")
    print(f"other processes used {100 * share:.0f}% of the machine's CPU time during the run"
          + ("  <- noisy: rerun on a quiet machine" if share > 0.05 else ""))
    print(f"bench=fusion ratio={f / s:.3f} seeds={k} fused_img_s={f:.1f} separate_img_s={s:.1f} "
          f"depth={DEPTH} batch={BATCH} threads={args.threads} wall_s={wall:.0f} others_cpu_frac={share:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
