"""Throughput of one trial on 1 worker against the same trial split over N workers (DistributedDataParallel),
at the same global batch, on this machine's CPUs (gloo) or GPUs (NCCL, one per worker).

Both runs are the product itself: `workers.trainer.run_trial` for 1 worker, `workers.launch.run_workers`
for N (the ranks as `ablate train --workers N` starts them). Each logs `img_per_s` (global images over
the window's wall time) every `--window` iterations; the first window is warm-up and dropped, the median
of the rest is the figure. On CPU the cores are shared out: 1 worker × all threads against N workers ×
(threads / N), so the comparison is of parallelism, not of hardware.

    .venv/bin/python bench/workers.py                   # ResNet-20, batch 128, 1 vs 2 workers, about 3 min here
    .venv/bin/python bench/workers.py --quick           # seconds
    .venv/bin/python bench/workers.py --device cuda --workers 8 --depth 110   # a GPU machine

The last line is `key=value` pairs; `ratio=` is N workers' img/s over 1 worker's (>1: the split pays).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `import workers` needs the repo root
    sys.path.insert(0, str(ROOT))

from workers.launch import run_workers  # noqa: E402
from workers.recipes import resolve_recipe  # noqa: E402
from workers.trainer import run_trial, trial_config  # noqa: E402


def rates(result: dict) -> list[float]:
    return [h["img_per_s"] for h in result["history"] if "img_per_s" in h][1:]  # window 0 is warm-up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128, help="global batch (split over the workers)")
    ap.add_argument("--window", type=int, default=5, help="iterations per timing window")
    ap.add_argument("--windows", type=int, default=4, help="measured windows (plus one warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all")
    ap.add_argument("--compile", action="store_true", help="torch.compile both runs (default: eager, no compile time)")
    ap.add_argument("--quick", action="store_true", help="smoke run: depth 8, tiny windows")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.window, args.windows = 8, 2, 1

    iterations = args.window * (args.windows + 1)
    recipe = resolve_recipe("smoke", dict(iterations=iterations, batch_size=args.batch, milestones=(),
                                          log_every=args.window, eval_every=iterations,
                                          checkpoint_every=iterations, eval_images=100))
    net = {"depth": args.depth, "unit": "original"}
    alone = run_trial(trial_config(net, "synthetic", recipe, seed=0), threads=args.threads, device=args.device,
                      compile_model=args.compile)
    many = run_workers(trial_config(net, "synthetic", recipe, seed=0, workers=args.workers),
                       threads=max(1, args.threads // args.workers), device=args.device, compile_model=args.compile)
    one, split = statistics.median(rates(alone)), statistics.median(rates(many))
    print(f"ResNet-{args.depth}, global batch {args.batch}, {args.device}: 1 worker {one:.1f} img/s "
          f"({args.threads} threads), {args.workers} workers {split:.1f} img/s "
          f"({max(1, args.threads // args.workers)} threads each)")
    print(f"bench=workers ratio={split / one:.3f} depth={args.depth} batch={args.batch} device={args.device} "
          f"workers={args.workers} one_img_s={one:.1f} split_img_s={split:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
