"""Scheduling efficiency: Ablate's grid runner against Ray Tune on the same short trials, same run.

40 trials of about 0.5 s (a sleep, so the measure is pure scheduling overhead) on 2 slots of one local
Ray. Ablate goes through everything it does for real trials: grid expansion, the state store (claims,
heartbeats, results), and MLflow (parent run, a child run per trial created on the driver's MLflow
thread ahead of submission, and synced after). Ray Tune runs the same 40 configurations as a
`grid_search` with one CPU per trial. Bare Ray tasks (all submitted at once, nothing recorded) give
the floor under both.

    efficiency = Σ trial time / (slots × makespan)     (1.0 = the slots never idle)

Makespan excludes `ray.init` and the start of each slot's worker process, for all three. Run: `.venv/bin/python bench/scheduling.py [--trials 40] [--repeat 3]` (medians over repeats).
The last line is `key=value` pairs with `ratio` = Ablate's efficiency / Ray Tune's.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRIAL_S = 0.5


def sleep_trial(task: dict) -> dict:
    """A trial that only takes time: what is left of a run is scheduling overhead."""
    began, start = time.time(), time.perf_counter()
    time.sleep(TRIAL_S)
    took = time.perf_counter() - start
    return {"status": "finished", "test_error": 50.0, "train_loss": 1.0, "train_error": 50.0, "history": [],
            "iterations": 1, "resumed_from": None, "took": took, "began": began, "ended": time.time()}


def run_ablate(trials: int, workdir: Path, slots: int = 2) -> tuple[float, float]:
    from orchestrator.grids import load_grid
    from orchestrator.scheduler import GridRunner
    from orchestrator.state import StateStore
    from orchestrator.tracking import Tracker

    spec = load_grid({"name": "bench-scheduling", "dataset": "synthetic", "recipe": "smoke", "depths": [8],
                      "block": "basic", "width": 4, "variants": ["original", "full_preact"], "seeds": trials // 2,
                      "resources": {"cpu": 1}})
    store = StateStore(f"sqlite:///{workdir / 'state.db'}")
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    tracker.experiment(spec.name)  # MLflow creates its schema on first use: not scheduling
    runner = GridRunner(store=store, tracker=tracker, trial_fn=sleep_trial, progress=False)
    wall, start = time.time(), time.perf_counter()
    out = runner.run(spec)
    makespan = time.perf_counter() - start
    assert out["counts"]["finished"] == trials and out["mlflow_unsynced"] == 0, out
    results = [t["result"] for t in store.grid_trials(out["grid"])]
    busy = sum(r["took"] for r in results)
    # Where the overhead sits: before the first trial, after the last, and between trials.
    lead, tail = min(r["began"] for r in results) - wall, wall + makespan - max(r["ended"] for r in results)
    print(f"Ablate: first trial began {lead:.2f} s after the call, the call returned {tail:.2f} s after the "
          f"last trial ended; {makespan - lead - tail - busy / slots:.2f} s per slot idle between them", file=sys.stderr)
    return busy, makespan


def run_ray_tasks(trials: int) -> tuple[float, float]:
    """The floor: the same sleeps as bare Ray tasks, all submitted at once, no state and no MLflow."""
    import ray
    remote = ray.remote(sleep_trial).options(num_cpus=1)
    start = time.perf_counter()
    results = ray.get([remote.remote({}) for _ in range(trials)])
    return sum(r["took"] for r in results), time.perf_counter() - start


def tune_trainable(config: dict) -> dict:
    start = time.perf_counter()
    time.sleep(TRIAL_S)
    return {"took": time.perf_counter() - start}


def run_tune(trials: int, workdir: Path) -> tuple[float, float]:
    from ray import tune
    tuner = tune.Tuner(tune.with_resources(tune_trainable, {"cpu": 1}),
                       param_space={"seed": tune.grid_search(list(range(trials)))},
                       run_config=tune.RunConfig(storage_path=str(workdir / "tune"), name="bench", verbose=0))
    start = time.perf_counter()
    results = tuner.fit()
    makespan = time.perf_counter() - start
    busy = sum(r.metrics["took"] for r in results)
    return busy, makespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="run all three this many times; report medians")
    args = parser.parse_args()
    import ray
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address="local", num_cpus=args.slots, include_dashboard=False, log_to_driver=False)
    # Each slot's worker process is started before every measurement: part of bringing Ray up, not of
    # scheduling. Ray ends idle task workers while Tune's actors hold the slots, so once is not enough.
    warm = ray.remote(lambda: time.sleep(0.3)).options(num_cpus=1)  # overlapping: one process per slot

    def warm_slots() -> None:
        ray.get([warm.remote() for _ in range(args.slots)])

    runs: dict[str, list[tuple[float, float]]] = {"ablate": [], "ray": [], "tune": []}
    for _ in range(args.repeat):  # each repeat on fresh state and MLflow stores: nothing is reused
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            os.environ["ABLATE_HOME"] = str(workdir / "home")
            warm_slots()
            runs["ablate"].append(run_ablate(args.trials, workdir, args.slots))
            warm_slots()
            runs["ray"].append(run_ray_tasks(args.trials))
            warm_slots()
            runs["tune"].append(run_tune(args.trials, workdir))

    def eff(run: tuple[float, float]) -> float:
        busy, span = run
        return busy / (args.slots * span)

    if args.repeat > 1:
        for name, got in runs.items():
            print(f"{name} efficiency per repeat: " + " ".join(f"{eff(r):.3f}" for r in got), file=sys.stderr)
    # Each one's median repeat (by efficiency; the upper one of an even count), so one noisy repeat moves nothing.
    (a_busy, a_span), (r_busy, r_span), (t_busy, t_span) = (
        sorted(runs[n], key=eff)[len(runs[n]) // 2] for n in ("ablate", "ray", "tune"))
    a_eff, r_eff, t_eff = (eff(r) for r in ((a_busy, a_span), (r_busy, r_span), (t_busy, t_span)))
    print(f"{'':10} {'makespan s':>11} {'busy s':>8} {'efficiency':>11}")
    print(f"{'Ablate':10} {a_span:11.2f} {a_busy:8.2f} {a_eff:11.3f}")
    print(f"{'Ray tasks':10} {r_span:11.2f} {r_busy:8.2f} {r_eff:11.3f}   (bare tasks: the floor under Ablate)")
    print(f"{'Ray Tune':10} {t_span:11.2f} {t_busy:8.2f} {t_eff:11.3f}")
    print(f"bench=scheduling trials={args.trials} slots={args.slots} trial_s={TRIAL_S} repeat={args.repeat} "
          f"ablate_eff={a_eff:.3f} ray_tasks_eff={r_eff:.3f} tune_eff={t_eff:.3f} ablate_makespan_s={a_span:.2f} "
          f"tune_makespan_s={t_span:.2f} ratio={a_eff / t_eff:.2f}")


if __name__ == "__main__":
    main()
