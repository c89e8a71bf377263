"""What watching a trial in MLflow costs: the same real trial trained with its metrics going nowhere and
with them going to MLflow through the trial's own sink, in the same run.

The trial is the demo's network on CIFAR-shaped synthetic data (ResNet-20 at width 8, the mini-cpu
schedule, batch 64, stretched to `--iterations`), trained by `workers.trainer.run_trial`, the product itself:
- null: `NullSink`, metrics recorded in the trial's history only;
- mlflow: `orchestrator.tracking.MlflowSink` on a child run of the embedded default store (sqlite, as
  `ablate run` without MLFLOW_TRACKING_URI), with its default log cadence (1% of the run, at least every
  30 s), evaluations every 100 iterations on 2,000 images, and the system-metrics monitor; the sink ships
  from its own thread in batches, as in a grid.
- mlflow-every-step: the same with `log_every: 1`, a hundred times the default cadence (the worst a
  recipe can ask).
The loops alternate (A B C A B C with the default two rounds) so that a noisy neighbour hits all of them.
Reported per loop: wall seconds of the trial (median over rounds), img/s over that wall time, the img/s the
trial logged (the mean of its windows: they tile the trial's wall time, so it should agree with images over
wall time), and the points in the MLflow run. The last line: `cost_pct=` the default cadence's extra wall
time over the null sink's, in percent of step time, and `ratio=` null wall / mlflow wall (1.0: free).

    .venv/bin/python bench/tracking.py                 # about 4 minutes on 2 quiet cores
    .venv/bin/python bench/tracking.py --iterations 200 --rounds 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workers.recipes import make_recipe, resolve_recipe  # noqa: E402
from workers.sinks import NullSink  # noqa: E402
from workers.trainer import run_trial, trial_config  # noqa: E402

def one_trial(mode: str, iterations: int, uri: str, seed: int) -> dict:
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import MlflowSink
    fields = {"log_every": 1} if mode == "mlflow-every-step" else {}
    recipe = resolve_recipe("mini-cpu").with_iterations(iterations)
    recipe = make_recipe({**recipe.model_dump(), **fields})
    config = trial_config({"depth": 20, "unit": "original", "width": 8}, "synthetic", recipe, seed=seed)
    run_id, sink = None, NullSink()
    if mode != "null":
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("bench-logging") or client.get_experiment(
            client.create_experiment("bench-logging"))
        run_id = client.create_run(experiment.experiment_id, run_name=f"{mode}-{seed}").info.run_id
        sink = MlflowSink(uri, run_id)
    start = time.perf_counter()
    result = run_trial(config, sink=sink, threads=None, device="cpu")
    sink.close()  # the trial's end, as in a grid: what is buffered is flushed before the trial returns
    wall = time.perf_counter() - start
    rates = [h["img_per_s"] for h in result["history"] if "img_per_s" in h]
    points = 0
    if run_id:
        client = MlflowClient(uri)
        points = sum(len(client.get_metric_history(run_id, m)) for m in client.get_run(run_id).data.metrics)
    return {"wall": wall, "img_s": iterations * recipe.batch_size / wall, "logged_img_s": statistics.mean(rates),
            "points": points, "history": len(result["history"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    modes = ("null", "mlflow", "mlflow-every-step")
    with tempfile.TemporaryDirectory(prefix="bench-logging-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        one_trial("null", min(args.iterations, 40), uri, seed=99)  # warm-up: imports, data, allocator
        got: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for m in modes:
                got[m].append(one_trial(m, args.iterations, uri, seed=r))
                print(f"round {r} {m}: {got[m][-1]['wall']:.1f} s", file=sys.stderr, flush=True)
    print(f"{'loop':18} {'wall s':>8} {'img/s':>8} {'logged img/s':>13} {'MLflow points':>14}")
    wall = {}
    for m in modes:
        wall[m] = statistics.median(g["wall"] for g in got[m])
        last = got[m][-1]
        print(f"{m:18} {wall[m]:8.1f} {statistics.median(g['img_s'] for g in got[m]):8.1f} "
              f"{statistics.median(g['logged_img_s'] for g in got[m]):13.1f} {last['points']:14d}")
    cost = 100 * (wall["mlflow"] - wall["null"]) / wall["null"]
    worst = 100 * (wall["mlflow-every-step"] - wall["null"]) / wall["null"]
    print(f"iterations={args.iterations} rounds={args.rounds} cost_pct={cost:.1f} every_step_cost_pct={worst:.1f} "
          f"ratio={wall['null'] / wall['mlflow']:.3f}")


if __name__ == "__main__":
    main()
