"""GPU training throughput of ResNet-110 (full pre-activation): naive loop, Ablate's fast path, fused seeds.

Variants, on CIFAR-shaped synthetic data (3×32×32, 10 classes, batch 128 per seed, pad-4 crop + flip,
SGD momentum 0.9, weight decay 1e-4), each timed for a fixed wall-clock budget after its warm-up:

- naive: what a typical user writes: a DataLoader (4 workers, pinned memory) over float images with
  per-sample torchvision transforms, the model in NCHW, eager fp32, `loss.item()` every step;
- fast: Ablate's path (workers/trainer.py): the dataset on the GPU as uint8, each batch gathered,
  normalised and augmented there (`workers.trainer.seed_batch`, the trainer's own steps), channels_last,
  bf16 autocast, torch.compile;
- fused-4, fused-8: k seeds as channel groups of one network (`workers.fused`), each seed with its own
  batch, the same bf16 + channels_last, compiled where compilation works (else eager, reported).
Each compiled variant is also measured eager, so compile's share is visible; the best of the two counts.

Throughput is seed-images per second (images of any seed). Every measurement runs in its own process
with a hard time limit, so a compilation that runs long cannot take the whole budget: it falls back to
the eager figure. Compile time (first step) is reported apart from throughput.

The projection is the GPU-hours of the paper's Table 2 on one such GPU: 5 units × depths 110 and 164
× 5 seeds × 64k iterations × batch 128, at the measured ResNet-110 speed, ResNet-164 scaled by its
forward-MAC ratio (`ablations.count_macs`); evaluation and data loading beyond the above are excluded.

    python bench/gpu.py                       # on the GPU machine (bench/gpu.sh sets it up)
    python bench/gpu.py --quick --device cpu  # smoke run of the whole script here, seconds per variant

The last line is `key=value` pairs; `ratio=` is the best fused seed-image throughput over naive's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `import workers` needs the repo root
    sys.path.insert(0, str(ROOT))

BATCH = 128
TABLE2 = dict(units=5, depths=(110, 164), seeds=5, iterations=64_000, batch=128)


# --- one measurement (runs in a child process) ------------------------------------------------------------
def measure(variant: str, k: int, compiled: bool, depth: int, batch: int, device: str, budget: float,
            warmup: int) -> dict:
    """Time one variant: `warmup` steps (the first one compiles), then steps until `budget` seconds."""
    import torch
    import torch.nn.functional as F
    from ablations import build_model, make_spec
    from workers.data import load_dataset
    from workers.fused import fused_model
    from workers.trainer import Batches, seed_batch

    dev = torch.device(device)
    cuda = dev.type == "cuda"  # cuDNN's defaults, as the trainer leaves them (no benchmark mode)
    spec = make_spec(depth=depth, unit="full_preact")
    data = load_dataset("synthetic")
    mean = data.mean
    scale = 1.0 / float((data.train.x[:10_000].float() - mean).std())

    if variant == "naive":
        from torchvision.transforms import v2

        class Augmented(torch.utils.data.Dataset):
            def __init__(self, x, y):
                self.x, self.y = x, y
                self.transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

            def __len__(self):
                return len(self.x)

            def __getitem__(self, i):
                return self.transform(self.x[i]), self.y[i]

        x = (data.train.x.float() - mean) * scale
        loader = torch.utils.data.DataLoader(Augmented(x, data.train.y), batch_size=batch, shuffle=True,
                                             drop_last=True, num_workers=4 if cuda else 0, pin_memory=cuda,
                                             persistent_workers=cuda)
        torch.manual_seed(0)
        model = build_model(spec).to(dev)
        batches = iter(())

        def next_batch():
            nonlocal batches
            try:
                return next(batches)
            except StopIteration:
                batches = iter(loader)
                return next(batches)

        def step():
            xb, yb = next_batch()
            loss = F.cross_entropy(model(xb.to(dev, non_blocking=True)), yb.to(dev, non_blocking=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()
    else:
        seeds = list(range(k))
        model = fused_model(spec, seeds) if k > 1 else build_model(spec)
        model = model.to(dev, memory_format=torch.channels_last)
        train_x, train_y, mean = data.train.x.to(dev), data.train.y.to(dev), mean.to(dev)
        order = [Batches(len(train_x), batch, s) for s in seeds]
        forward = torch.compile(model) if compiled else model
        it = 0

        def step():
            # The product's step (workers/trainer.py run_trials; with k = 1 run_trial): per-seed batches, one
            # forward over the stacked seeds, the sum of per-seed mean losses, one host sync for the values.
            nonlocal it
            parts = [seed_batch(train_x, train_y, order[j], s, it, mean, scale, True) for j, s in enumerate(seeds)]
            xb = torch.cat([p[0] for p in parts], 1).contiguous(memory_format=torch.channels_last)
            yb = torch.stack([p[1] for p in parts], 1)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                logits = forward(xb).float().unflatten(1, (k, -1))
                losses = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(0)
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
            it += 1
            return losses.detach().tolist()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        step()
    sync()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget:
        step()
        steps += 1
    sync()
    elapsed = time.perf_counter() - t0
    return {"variant": variant, "k": k, "compiled": compiled, "img_s": steps * batch * k / elapsed,
            "steps": steps, "first_step_s": first,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def product_check(device: str) -> dict:
    """run_trials (fused) against run_trial on this device, tiny network, 20 iterations: the product runs
    here and per-seed results agree (bf16 on a GPU: close, not within the CPU test's tolerance)."""
    from workers.recipes import resolve_recipe
    from workers.trainer import run_trial, run_trials, trial_config
    recipe = resolve_recipe("smoke", dict(iterations=20, eval_every=10, checkpoint_every=20, milestones=()))
    configs = [trial_config(dict(depth=8, block="basic", width=4), "synthetic", recipe, s, subset=512)
               for s in (0, 1)]
    fused = run_trials(configs, device=device, compile_model=False)
    solo = [run_trial(c, device=device, compile_model=False) for c in configs]
    return {"fused_train_loss": [r["train_loss"] for r in fused], "solo_train_loss": [r["train_loss"] for r in solo],
            "fused_test_error": [r["test_error"] for r in fused], "solo_test_error": [r["test_error"] for r in solo]}


# --- the driver ---------------------------------------------------------------------------------------------
def child(args: list[str], limit: float) -> dict | None:
    """Run one measurement in its own process; None when it fails or runs past `limit` seconds."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, limit), cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(f"  {' '.join(args)}: stopped after {limit:.0f} s", flush=True)
        return None
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        print(f"  {' '.join(args)}: failed (exit {out.returncode}): {' | '.join(tail)}", flush=True)
        return None
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="smoke run: ResNet-20, batch 16, 2 s per measurement")
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds for all measurements (default 420)")
    ap.add_argument("--budget", type=float, default=None, help="seconds timed per measurement (default 20)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="torch.compile the fast and fused variants (auto: on a GPU only)")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")

    if args.child is not None:
        name, *rest = args.child
        if name == "product":
            print(json.dumps(product_check(rest[0])))
        else:
            k, compiled, depth, batch, device, budget, warmup = rest
            print(json.dumps(measure(name, int(k), compiled == "1", int(depth), int(batch), device,
                                     float(budget), int(warmup))))
        return 0

    import torch
    from ablations import build_model, count_macs
    start = time.perf_counter()
    deadline = start + args.deadline
    depth, batch = (20, 16) if args.quick else (110, BATCH)
    budget = args.budget or (2.0 if args.quick else 20.0)
    compile_on = args.compile == "on" or (args.compile == "auto" and args.device.startswith("cuda"))
    if args.device.startswith("cuda"):
        print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    else:
        print(f"torch {torch.__version__}, {args.device}", flush=True)

    def left() -> float:
        return deadline - time.perf_counter()

    def run(variant: str, k: int, compiled: bool, warmup: int, cap: float) -> dict | None:
        limit = min(cap, left())
        if limit < budget + 5:
            print(f"  {variant} k={k}{' compiled' if compiled else ''}: skipped, {left():.0f} s left", flush=True)
            return None
        r = child([variant, str(k), "1" if compiled else "0", str(depth), str(batch), args.device, str(budget),
                   str(warmup)], limit)
        if r:
            print(f"  {variant:<6} k={k} {'compiled' if compiled else 'eager':<8} {r['img_s']:9.0f} seed-img/s "
                  f"({r['steps']} steps; first step {r['first_step_s']:.1f} s"
                  + (f"; peak {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "") + ")", flush=True)
        return r

    # Eager first (cheap and certain), compiled after, each compile capped by what is left.
    eager_cap = budget + 60
    results = {"naive": run("naive", 1, False, 5, eager_cap)}
    for k in (1, 4, 8):
        results[("eager", k)] = run("fused" if k > 1 else "fast", k, False, 5, eager_cap)
    if compile_on:
        for k in (1, 8, 4):
            results[("compiled", k)] = run("fused" if k > 1 else "fast", k, True, 5, 240)
    check = child(["product", args.device], min(120.0, max(1.0, left()))) if left() > 20 else None

    def best(k: int) -> dict | None:
        found = [r for r in (results.get(("eager", k)), results.get(("compiled", k))) if r]
        return max(found, key=lambda r: r["img_s"]) if found else None

    naive = results["naive"]
    rows = {"naive": naive, "fast": best(1), "fused-4": best(4), "fused-8": best(8)}
    macs = {d: count_macs(build_model(depth=d, unit="full_preact"), 32) for d in TABLE2["depths"]}
    images = TABLE2["units"] * TABLE2["seeds"] * TABLE2["iterations"] * TABLE2["batch"]  # per depth
    print(f"\nResNet-{depth} full_preact, batch {batch} per seed, {args.device}, {budget:.0f} s per measurement, "
          f"wall {time.perf_counter() - start:.0f} s")
    print(f"  {'variant':<9}{'seed-img/s':>12}{'vs naive':>10}{'compiled':>10}{'1st step s':>12}{'Table 2 GPU-h':>15}")
    kv = {"bench": "gpu", "device": args.device.replace(" ", "_"), "depth": depth}
    for name, r in rows.items():
        if r is None:
            print(f"  {name:<9}{'—':>12}")
            continue
        # Hours for both depths at this variant's per-seed-image speed; 164 scaled by forward MACs.
        hours = sum(images / (r["img_s"] * macs[110] / macs[d]) for d in TABLE2["depths"]) / 3600
        vs = r["img_s"] / naive["img_s"] if naive else float("nan")
        print(f"  {name:<9}{r['img_s']:>12.0f}{vs:>10.2f}{'yes' if r['compiled'] else 'no':>10}"
              f"{r['first_step_s']:>12.1f}{hours:>15.1f}")
        key = name.replace("-", "")
        kv[f"{key}_img_s"] = f"{r['img_s']:.0f}"
        kv[f"{key}_table2_gpu_h"] = f"{hours:.1f}"
        kv[f"{key}_compiled"] = int(r["compiled"])
    compiled = [r for r in results.values() if isinstance(r, dict) and r["compiled"]]
    for r in compiled:
        kv[f"compile_s_k{r['k']}"] = f"{r['first_step_s']:.0f}"
    if args.quick:
        print("  (--quick: ResNet-20 at batch 16 for seconds; the figures and the projection mean nothing)")
    print(f"  (ResNet-164 taken as {macs[164] / macs[110]:.3f}× ResNet-110's forward MACs: "
          f"{macs[164] / 1e6:.0f} vs {macs[110] / 1e6:.0f} M)")
    if check:
        fused_loss, solo_loss = check["fused_train_loss"], check["solo_train_loss"]
        print(f"  product check (run_trials vs run_trial, depth 8, 20 it.): train loss fused "
              f"{[round(v, 4) for v in fused_loss]} solo {[round(v, 4) for v in solo_loss]}; "
              f"test error fused {check['fused_test_error']} solo {check['solo_test_error']}")
        kv["product_max_loss_diff"] = f"{max(abs(a - b) for a, b in zip(fused_loss, solo_loss)):.2e}"
    fused = [r for r in (rows["fused-4"], rows["fused-8"]) if r]
    if naive and fused:
        top = max(fused, key=lambda r: r["img_s"])
        kv["ratio"] = f"{top['img_s'] / naive['img_s']:.2f}"
        kv["best_k"] = top["k"]
        if rows["fast"]:
            kv["ratio_fast"] = f"{rows['fast']['img_s'] / naive['img_s']:.2f}"
            kv["ratio_fused_vs_fast"] = f"{top['img_s'] / rows['fast']['img_s']:.2f}"
    else:
        kv["ratio"] = "nan"
    kv["wall_s"] = f"{time.perf_counter() - start:.0f}"
    print(" ".join(f"{k}={v}" for k, v in kv.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
