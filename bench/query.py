"""Comparison-table query: Ablate's read path against `mlflow.search_runs` over the same 10,000 trials.

What it measures (both sides in the same run, same data, same statistics):

- ablate: `StateStore.results_table(grid_id)` (one SQL query into a pyarrow Table), then
  `dashboards.stats.compare(table, baseline, variant_order=...)`: what `ablate compare` does.
- mlflow: `mlflow.search_runs(experiment_ids=[exp], filter_string="tags.mlflow.parentRunId = '<parent>'",
  search_all_experiments=False)` over the grid's child runs (MLflow pages through them itself, 10,000 runs
  per page up to the default max_results of 100,000; the script checks all 10,000 came back), the
  `tags.ablate.*` / `metrics.*` columns turned into the same results frame, then the same `compare`.
  This is what a user of MLflow alone writes to build the table from the tracking store.
- `*_read_s`: the read part alone (Ablate: `results_table`; MLflow: `search_runs` plus the column
  conversion; `mlflow_search_s` is `search_runs` by itself).

Data (setup, not timed): one grid `load_grid` + `expand_grid`: dataset `synthetic`, depths 20/32/44/56,
10 variants, 250 seeds = 10,000 trials; test errors drawn per variant (and depth) from normal
distributions around the paper's CIFAR-10 figures, numpy seed 0, a few variants above the paper's 20%
"fail" line. Ablate side: a fresh sqlite state store filled through the public API only
(`register_grid`, then `claim` + `finish` per trial). MLflow side: a sqlite tracking store in the
layout of shared/CONTRACT.md: an experiment named after the grid, a parent run made by
`Tracker.start_grid`, and per trial a child run with the same tags `Tracker.start_trial` sets (final
`ablate.status`), the resolved configuration as params (29 per run) and `train_loss`, `train_error`,
`test_error` at the evaluation steps, terminated FINISHED.

Writing 10,000 runs through `MlflowClient` costs about 70 ms a run here (7 fsynced commits each: about
12 minutes); MLflow's store API (`SqlAlchemyStore.create_run` + `log_batch` + `update_run_info`) with
sqlite's `synchronous=OFF` + WAL is about 25 ms a run on an idle core, and took 10.5 minutes in 2
processes on this shared 2-core machine. So by default (`--writer bulk`) the fixture is written as:
the first 20 child runs through that store API; for each of them the rows the bulk writer would produce
are checked equal, column by column (clock columns aside), to what MLflow itself wrote in `runs`, `tags`,
`params`, `metrics` and `latest_metrics` (the only tables those calls touch); then the other 9,980 runs
go in as those same rows, one executemany per table through MLflow's own table models, in one
transaction (seconds). A full cross-check of a bulk fixture against a store-API one (same trials and
values) found all 10,000 runs identical in every table. `--writer api` writes every run through the
store API instead (2 processes). Either fixture is cached under
`/tmp/ablate-bench-cache/query-<content key>/` (key: writer, MLflow version, every trial key, the drawn
values; override the root with ABLATE_BENCH_CACHE) and copied into the run's temp dir; `--no-cache`
rebuilds it and throws it away. Only the fixture is cached: the Ablate store is rebuilt every time, and
every timed `search_runs` goes through MLflow's public API to sqlite.

Timing: one untimed warm-up of each side, then `--repeats` rounds alternating ablate, mlflow (drift hits
both). Reported: median (and best) seconds. Both sides' comparison rows are checked to agree; only the
bootstrap CI end points may differ (BCa resamples by position, and the two stores return rows in
different orders): the largest difference is printed.

Run from the repository root (about 4-5 minutes on 2 shared cores, most of it filling the Ablate store
through its public API and the MLflow side's timed searches):

    .venv/bin/python bench/query.py
    .venv/bin/python bench/query.py --repeats 3 --no-cache
    .venv/bin/python bench/query.py --writer api     # every child run through MLflow's store API (slow)

The last line is `key=value` pairs; `ratio=` is mlflow_s / ablate_s (>1: Ablate is faster).
Targets: ablate_s < 1 and ratio >= 10.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: `import orchestrator` needs the repo root
    sys.path.insert(0, str(ROOT))

CACHE_ROOT = Path(os.environ.get("ABLATE_BENCH_CACHE", "/tmp/ablate-bench-cache"))
FIXTURE_VERSION = "1"   # bump when the generated MLflow content changes (invalidates the cache)
DEPTHS = [20, 32, 44, 56]
# (variant, mean test error %, sd): around the paper's CIFAR-10 ResNet-110 figures (Tables 1 and 2);
# the "fail" variants of the paper sit above 20% with a wide spread.
VARIANTS = [("original", 6.61, 0.20), ("bn_after_add", 8.17, 0.25), ("relu_before_add", 7.84, 0.22),
            ("relu_only_preact", 6.71, 0.20), ("full_preact", 6.37, 0.18), ("scale-0.5", 24.0, 6.0),
            ("exclusive_gate-b-6", 8.70, 0.40), ("shortcut_gate-b0", 12.86, 1.2), ("conv1x1", 12.22, 0.9),
            ("dropout-0.5", 35.0, 8.0)]
BASELINE = "original"
API_WORKERS = 2   # processes for --writer api (2 cores)
TEMPLATE_RUNS = 20   # --writer bulk: runs written through the store API, the pattern the bulk rows are checked on
USER = "bench-query"


def log(msg: str) -> None:
    print(f"[query] {msg}", file=sys.stderr, flush=True)


# --- data ----------------------------------------------------------------------------------------------

def make_grid(trials: int):
    from orchestrator.grids import expand_grid, load_grid
    seeds = max(1, math.ceil(trials / (len(DEPTHS) * len(VARIANTS))))
    spec = load_grid({"name": "bench-query", "dataset": "synthetic", "recipe": "smoke", "depths": DEPTHS,
                      "variants": [v for v, _, _ in VARIANTS], "seeds": seeds, "baseline": BASELINE})
    return spec, expand_grid(spec, max_trials=len(DEPTHS) * len(VARIANTS) * seeds)


def draw_results(trials) -> list[dict]:
    """A result per trial (what `finish` receives), reproducible: numpy seed 0, drawn in grid order."""
    import numpy as np
    rng = np.random.default_rng(0)
    params = {v: (m, s) for v, m, s in VARIANTS}
    out = []
    for t in trials:
        mean, sd = params[t.variant]
        mean += 0.01 * (t.depth - 20)          # a small depth effect, so settings differ
        test_error = float(np.clip(rng.normal(mean, sd), 0.0, 100.0))
        train_error = float(np.clip(test_error * rng.uniform(0.05, 0.3), 0.0, 100.0))
        train_loss = float(max(1e-4, train_error / 40 + rng.normal(0.0, 0.01)))
        history = [{"step": 20, "test_error": min(100.0, test_error * 1.4), "train_loss": train_loss * 2,
                    "train_error": min(100.0, train_error * 2)},
                   {"step": 40, "test_error": test_error, "train_loss": train_loss, "train_error": train_error}]
        out.append({"status": "finished", "test_error": test_error, "train_loss": train_loss,
                    "train_error": train_error, "iterations": 40, "history": history})
    return out


# --- Ablate side ---------------------------------------------------------------------------------------

def fill_state(url: str, spec, trials, results) -> tuple[object, str]:
    """The state store through its public API: register the grid, then claim + finish every trial."""
    from orchestrator.state import StateStore
    store = StateStore(url)
    grid_id = spec.grid_id()
    start = time.perf_counter()
    store.register_grid(grid_id, spec.name, spec.model_dump(mode="json", by_alias=True), trials)
    log(f"register_grid: {len(trials)} trials in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    for i, (t, r) in enumerate(zip(trials, results)):
        if not store.claim(t.key, "bench-query"):
            raise RuntimeError(f"could not claim {t.key}")
        if not store.finish(t.key, "bench-query", r):
            raise RuntimeError(f"could not finish {t.key}")
        if (i + 1) % 2500 == 0:
            log(f"claim+finish: {i + 1}/{len(trials)} ({time.perf_counter() - start:.0f} s)")
    log(f"claim+finish: {len(trials)} in {time.perf_counter() - start:.1f} s")
    counts = store.counts(grid_id)
    assert counts["finished"] == len(trials), counts
    return store, grid_id


# --- MLflow side ---------------------------------------------------------------------------------------

def _child_rows(spec, grid_id: str, trials, results) -> list[dict]:
    """Per trial what `Tracker.start_trial` + `Tracker.sync` leave in the child run (status final)."""
    from orchestrator.tracking import flatten
    rows = []
    for t, r in zip(trials, results):
        config = json.loads(t.config.model_dump_json())   # as the scheduler passes it: the stored JSON
        model = config["model"]
        tags = {"ablate.grid": grid_id, "ablate.trial": t.key, "ablate.variant": t.variant,
                "ablate.unit": model["unit"], "ablate.shortcut": model["shortcut"], "ablate.depth": str(t.depth),
                "ablate.dataset": t.dataset, "ablate.seed": str(t.seed), "ablate.status": r["status"]}
        metrics = [(k, float(h[k]), int(h["step"])) for h in r["history"]
                   for k in ("train_loss", "train_error", "test_error")]
        rows.append({"name": f"{t.variant}-d{t.depth}-s{t.seed}", "tags": tags,
                     "params": flatten("", config), "metrics": metrics})
    return rows


def _fast_sqlite(store) -> None:
    """Generation only: no fsync per commit, WAL so concurrent writers interleave. Rows are unchanged."""
    from sqlalchemy import event

    def pragmas(conn, _record):
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=OFF")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()
    event.listen(store.engine, "connect", pragmas)
    store.engine.dispose()   # connections opened before the listener would keep the old settings


def _open_store(uri: str, artifact_root: str):
    import logging
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    store = SqlAlchemyStore(uri, artifact_root)
    _fast_sqlite(store)
    return store


def _write_runs_api(store, experiment_id: str, parent: str, rows: list[dict], label: int) -> list[str]:
    """Child runs through MLflow's store API: create_run (tags) + log_batch (params, metrics) + terminate."""
    from mlflow.entities import Metric, Param, RunStatus, RunTag
    start, run_ids = time.perf_counter(), []
    for i, row in enumerate(rows):
        now = int(time.time() * 1000)
        tags = [RunTag("mlflow.parentRunId", parent)] + [RunTag(k, v) for k, v in row["tags"].items()]
        run_id = store.create_run(experiment_id, USER, now, tags, row["name"]).info.run_id
        store.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v, step in row["metrics"]],
                        params=[Param(k, v) for k, v in row["params"].items()], tags=[])
        store.update_run_info(run_id, RunStatus.FINISHED, now, None)
        run_ids.append(run_id)
        if (i + 1) % 1000 == 0:
            log(f"mlflow writer {label}: {i + 1}/{len(rows)} runs ({time.perf_counter() - start:.0f} s)")
    return run_ids


def _api_worker(uri: str, artifact_root: str, experiment_id: str, parent: str, rows: list[dict], label: int) -> int:
    store = _open_store(uri, artifact_root)
    n = len(_write_runs_api(store, experiment_id, parent, rows, label))
    store.engine.dispose()
    return n


# Columns the store fills from the clock: the only ones the bulk rows may differ in from the API's.
CLOCK_COLUMNS = {"runs": ("start_time", "end_time"), "metrics": ("timestamp",), "latest_metrics": ("timestamp",)}


def _bulk_rows(row: dict, run_id: str, parent: str, experiment_id: str, location: str, now: int) -> dict:
    """The rows `create_run` + `log_batch` + `update_run_info(FINISHED)` leave for one child run, by table."""
    from mlflow.entities import LifecycleStage, RunStatus, SourceType
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.utils.uri import append_to_uri_path
    run = {"run_uuid": run_id, "name": row["name"], "source_type": SourceType.to_string(SourceType.UNKNOWN),
           "source_name": "", "entry_point_name": "", "user_id": USER,
           "status": RunStatus.to_string(RunStatus.FINISHED),
           "start_time": now, "end_time": now, "source_version": "", "lifecycle_stage": LifecycleStage.ACTIVE,
           "artifact_uri": append_to_uri_path(location, run_id, SqlAlchemyStore.ARTIFACTS_FOLDER_NAME),
           "experiment_id": int(experiment_id), "deleted_time": None}
    tags = {"mlflow.parentRunId": parent, **row["tags"], "mlflow.runName": row["name"]}
    metrics = [{"key": k, "value": v, "timestamp": now, "step": step, "is_nan": False, "run_uuid": run_id}
               for k, v, step in row["metrics"]]
    latest: dict[str, dict] = {}
    for m in metrics:   # MLflow's rule: the latest value is the one at the highest (step, timestamp, value)
        have = latest.get(m["key"])
        if have is None or (m["step"], m["timestamp"], m["value"]) > (have["step"], have["timestamp"], have["value"]):
            latest[m["key"]] = m
    return {"runs": [run], "tags": [{"key": k, "value": v, "run_uuid": run_id} for k, v in tags.items()],
            "params": [{"key": k, "value": v, "run_uuid": run_id} for k, v in row["params"].items()],
            "metrics": metrics, "latest_metrics": [dict(m) for m in latest.values()]}


def _table_rows(store, run_id: str) -> dict:
    """What the database holds for one run, in the shape `_bulk_rows` builds."""
    from sqlalchemy import select
    with store.engine.connect() as conn:
        return {name: [dict(r) for r in conn.execute(select(table).where(table.c.run_uuid == run_id)).mappings()]
                for name, table in _tables().items()}


def _tables() -> dict:
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
    return {"runs": SqlRun.__table__, "tags": SqlTag.__table__, "params": SqlParam.__table__,
            "metrics": SqlMetric.__table__, "latest_metrics": SqlLatestMetric.__table__}


def _normalised(rows_by_table: dict) -> dict:
    return {name: sorted(tuple(sorted((k, v) for k, v in r.items() if k not in CLOCK_COLUMNS.get(name, ())))
                         for r in rows) for name, rows in rows_by_table.items()}


def _bulk_worker(uri: str, artifact_root: str, experiment_id: str, parent: str, rows: list[dict], label: int) -> int:
    """The first TEMPLATE_RUNS child runs through the store API; for each of them the rows `_bulk_rows` would
    write are checked equal to what the API wrote (every column of runs, tags, params, metrics and
    latest_metrics, clock columns aside); then the rest go in as those rows, one executemany per table."""
    from sqlalchemy import insert
    store = _open_store(uri, artifact_root)
    location = store.get_experiment(experiment_id).artifact_location
    start = time.perf_counter()
    template = rows[:TEMPLATE_RUNS]
    for row, run_id in zip(template, _write_runs_api(store, experiment_id, parent, template, label)):
        expected = _normalised(_bulk_rows(row, run_id, parent, experiment_id, location, 0))
        actual = _normalised(_table_rows(store, run_id))
        if expected != actual:
            bad = [name for name in expected if expected[name] != actual[name]]
            raise RuntimeError(f"bulk rows differ from MLflow's own in {bad}: the bulk writer needs updating "
                               f"for MLflow {__import__('mlflow').__version__} (use --writer api)")
    log(f"mlflow writer {label}: {len(template)} runs via the store API in {time.perf_counter() - start:.1f} s, "
        f"bulk rows match them")
    import uuid
    tables: dict[str, list] = {name: [] for name in _tables()}
    now = int(time.time() * 1000)
    for row in rows[len(template):]:
        for name, part in _bulk_rows(row, uuid.uuid4().hex, parent, experiment_id, location, now).items():
            tables[name] += part
    with store.ManagedSessionMaker(read_only=False) as session:   # one transaction: all or nothing
        for name, table in _tables().items():
            if tables[name]:
                session.execute(insert(table), tables[name])
    log(f"mlflow writer {label}: {len(rows) - len(template)} runs in bulk, {time.perf_counter() - start:.1f} s "
        f"in all")
    store.engine.dispose()
    return len(rows)


def cache_key(trials, results, writer: str) -> str:
    import mlflow
    h = hashlib.sha256()
    h.update(f"{FIXTURE_VERSION}|{writer}|{mlflow.__version__}|{len(trials)}".encode())
    for t, r in zip(trials, results):
        h.update(f"{t.key}|{t.variant}|{t.depth}|{t.seed}|{r['test_error']!r}|{r['train_loss']!r}|"
                 f"{r['train_error']!r}\n".encode())
    return h.hexdigest()[:16]


def start_mlflow_fixture(spec, grid_id: str, trials, results, use_cache: bool, writer: str):
    """(folder, None, None) for a cached fixture, else (build folder, meta, job) with the child runs being
    written by a process pool while the caller fills the Ablate store."""
    key = cache_key(trials, results, writer)
    final = CACHE_ROOT / f"query-{key}"
    if use_cache and (final / "meta.json").exists():
        log(f"MLflow fixture: cached at {final}")
        return final, None, None
    build = CACHE_ROOT / f"query-{key}.build-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    uri = f"sqlite:///{build / 'mlflow.db'}"
    from orchestrator.tracking import Tracker
    start = time.perf_counter()
    # The experiment and parent run through Ablate's own Tracker (MLflow creates its schema here).
    os.environ["ABLATE_HOME"] = str(build)   # Tracker puts a sqlite store's artifacts under ABLATE_HOME
    tracker = Tracker(uri)
    experiment_id = tracker.experiment(spec.name)
    parent = tracker.start_grid(spec.name, grid_id)
    workers = API_WORKERS if writer == "api" else 1
    log(f"MLflow fixture: schema + parent run in {time.perf_counter() - start:.1f} s; writing {len(trials)} "
        f"child runs ({writer}) in {workers} process(es)")
    rows = _child_rows(spec, grid_id, trials, results)
    ctx = mp.get_context("spawn")   # fresh interpreters: no SQLAlchemy engines inherited through fork
    pool = ctx.Pool(workers)
    chunk = math.ceil(len(rows) / workers)
    target = _api_worker if writer == "api" else _bulk_worker
    pending = [pool.apply_async(target, (uri, str(build / "mlartifacts"), experiment_id, parent,
                                         rows[i * chunk:(i + 1) * chunk], i)) for i in range(workers)]
    pool.close()
    meta = {"experiment_id": experiment_id, "parent_run_id": parent, "trials": len(trials), "key": key,
            "writer": writer, "tracker": tracker, "build": build, "final": final, "start": start}
    return build, meta, (pool, pending)


def finish_mlflow_fixture(meta, job, use_cache: bool) -> Path:
    pool, pending = job
    written = sum(p.get() for p in pending)
    pool.join()
    build, final, tracker = meta["build"], meta["final"], meta["tracker"]
    tracker.end_grid(meta["parent_run_id"], {"finished": written})
    import sqlite3
    # A self-contained, consistent copy (the WAL folded in) even while this process's MLflow client
    # still holds a connection to the working file.
    src, dst = sqlite3.connect(build / "mlflow.db"), sqlite3.connect(build / "fixture.db")
    src.backup(dst)
    dst.execute("PRAGMA journal_mode=DELETE")
    src.close()
    dst.close()
    for extra in ("mlflow.db", "mlflow.db-wal", "mlflow.db-shm"):
        (build / extra).unlink(missing_ok=True)
    (build / "meta.json").write_text(json.dumps({k: meta[k] for k in ("experiment_id", "parent_run_id",
                                                                     "trials", "key", "writer")}))
    log(f"MLflow fixture: {written} child runs in {time.perf_counter() - meta['start']:.0f} s")
    if not use_cache:
        return build
    shutil.rmtree(final, ignore_errors=True)
    os.replace(build, final)   # atomic: a half-built fixture is never taken for a cached one
    return final


# --- the timed reads -----------------------------------------------------------------------------------

def ablate_once(store, grid_id: str, order: list[str]):
    from dashboards.stats import compare
    t0 = time.perf_counter()
    table = store.results_table(grid_id)
    t1 = time.perf_counter()
    rows = compare(table, baseline=BASELINE, variant_order=order)
    t2 = time.perf_counter()
    return {"read": t1 - t0, "total": t2 - t0}, rows, table.num_rows


def mlflow_once(experiment_id: str, parent: str, order: list[str]):
    import mlflow
    import pandas as pd
    from dashboards.stats import compare
    t0 = time.perf_counter()
    runs = mlflow.search_runs(experiment_ids=[experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                              max_results=100_000, search_all_experiments=False)
    t1 = time.perf_counter()
    # The same results frame as Ablate's: labels come back as string tags, metrics as their latest value.
    frame = pd.DataFrame({"dataset": runs["tags.ablate.dataset"], "depth": runs["tags.ablate.depth"].astype("int64"),
                          "variant": runs["tags.ablate.variant"], "seed": runs["tags.ablate.seed"].astype("int64"),
                          "status": runs["tags.ablate.status"], "test_error": runs["metrics.test_error"],
                          "train_loss": runs["metrics.train_loss"], "train_error": runs["metrics.train_error"]})
    t2 = time.perf_counter()
    rows = compare(frame, baseline=BASELINE, variant_order=order)
    t3 = time.perf_counter()
    return {"search": t1 - t0, "read": t2 - t0, "total": t3 - t0}, rows, len(frame)


def check_same(a: list[dict], b: list[dict]) -> float:
    """Both paths give the same table. Returns the largest CI end-point difference: the BCa bootstrap
    resamples by position, so it depends on the row order each store returns (everything else must match)."""
    assert len(a) == len(b), (len(a), len(b))
    worst = 0.0
    for x, y in zip(a, b):
        assert x["setting"] == y["setting"] and x["variant"] == y["variant"], (x, y)
        for k in ("n", "failed", "seeds", "decision", "paper"):
            assert x[k] == y[k], (k, x[k], y[k])
        for k in ("mean", "std", "median", "min", "max", "delta", "delta_ci_low", "delta_ci_high", "p_value",
                  "p_holm", "effect_size", "p_improve"):
            assert (x[k] is None) == (y[k] is None) and (x[k] is None or math.isclose(x[k], y[k], rel_tol=1e-9,
                                                                                      abs_tol=1e-9)), (k, x, y)
        for k in ("ci_low", "ci_high"):
            if x[k] is not None:
                worst = max(worst, abs(x[k] - y[k]))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per side (after one warm-up)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild the MLflow fixture (not kept)")
    parser.add_argument("--writer", choices=("bulk", "api"), default="bulk",
                        help="how the MLflow fixture's child runs are written (see the docstring)")
    args = parser.parse_args()
    wall = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import logging
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    spec, trials = make_grid(args.trials)
    results = draw_results(trials)
    grid_id = spec.grid_id()
    order = [v for v, _, _ in VARIANTS]
    log(f"grid {grid_id}: {len(trials)} trials expanded in {time.perf_counter() - wall:.1f} s")

    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        tmp = Path(tmp)
        use_cache = not args.no_cache
        folder, meta, job = start_mlflow_fixture(spec, grid_id, trials, results, use_cache, args.writer)
        try:
            # The Ablate store fills in this process while MLflow's child runs are written in the pool.
            store, grid_id = fill_state(f"sqlite:///{tmp / 'state.db'}", spec, trials, results)
            if job is not None:
                folder = finish_mlflow_fixture(meta, job, use_cache)
        except BaseException:
            if job is not None:
                job[0].terminate()
                shutil.rmtree(meta["build"], ignore_errors=True)
            raise
        fixture = json.loads((folder / "meta.json").read_text())
        shutil.copy(folder / "fixture.db", tmp / "mlflow.db")   # read a private copy; the cache stays pristine
        if args.no_cache:
            shutil.rmtree(folder, ignore_errors=True)
        setup_s = time.perf_counter() - wall
        log(f"setup done in {setup_s:.0f} s")

        import mlflow
        mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
        experiment_id, parent = fixture["experiment_id"], fixture["parent_run_id"]

        # Warm-up (imports, MLflow's store and engine, sqlite page cache), untimed; checks both agree.
        _, rows_a, n_a = ablate_once(store, grid_id, order)
        _, rows_m, n_m = mlflow_once(experiment_id, parent, order)
        assert n_a == n_m == len(trials), (n_a, n_m, len(trials))
        ci_diff = check_same(rows_a, rows_m)

        times_a, times_m = [], []
        for i in range(args.repeats):   # alternate A/B so drift hits both sides
            times_a.append(ablate_once(store, grid_id, order)[0])
            times_m.append(mlflow_once(experiment_id, parent, order)[0])
            log(f"round {i + 1}: ablate {times_a[-1]['total']:.3f} s, mlflow {times_m[-1]['total']:.2f} s")

    def med(ts, k):
        return statistics.median(t[k] for t in ts)

    def best(ts, k):
        return min(t[k] for t in ts)

    print(f"{'':18}{'median s':>10}{'best s':>10}")
    for label, ts, k in (("ablate read", times_a, "read"), ("ablate total", times_a, "total"),
                         ("mlflow search", times_m, "search"), ("mlflow read", times_m, "read"),
                         ("mlflow total", times_m, "total")):
        print(f"{label:18}{med(ts, k):10.3f}{best(ts, k):10.3f}")
    ablate_s, mlflow_s = med(times_a, "total"), med(times_m, "total")
    ratio = mlflow_s / ablate_s
    print(f"cells={len(rows_a)} rows agree (CI end points differ by <= {ci_diff:.3g}: bootstrap sees row order)")
    print(f"targets: ablate_s < 1: {'met' if ablate_s < 1 else 'MISSED'}; "
          f"ratio >= 10: {'met' if ratio >= 10 else 'MISSED'}")
    print(f"bench=query trials={len(trials)} ablate_s={ablate_s:.3f} mlflow_s={mlflow_s:.2f} "
          f"ablate_read_s={med(times_a, 'read'):.3f} mlflow_read_s={med(times_m, 'read'):.2f} "
          f"mlflow_search_s={med(times_m, 'search'):.2f} ablate_best_s={best(times_a, 'total'):.3f} "
          f"mlflow_best_s={best(times_m, 'total'):.2f} repeats={args.repeats} setup_s={setup_s:.0f} "
          f"wall_s={time.perf_counter() - wall:.0f} ratio={ratio:.1f}")


if __name__ == "__main__":
    main()
