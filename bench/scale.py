"""Cluster scale, measured: grids of placeholder trials over many slots, the state on PostgreSQL and MLflow on
a server, against Ray Tune on the same trials in the same run.

Everything runs on this machine inside its own network and PID namespaces (the bench starts itself again
under `unshare`, so traffic stays on loopback and no process outlives it): PostgreSQL 15 (databases `ablate`
and `mlflow`), a real `mlflow server` on PostgreSQL, and a Ray head (`ray start --head --num-cpus SLOTS`)
whose logical CPUs are the slots. A trial is a placeholder: a sleep of T seconds (no training), written to
its checkpoint folder as `result.json` like a real trial, so what is measured is the orchestration. The
Ablate driver is a process of its own (`scale.py drive`): the real GridRunner with grid expansion, the state
store (claims, heartbeats, results), the Ray path and MLflow (a parent run, a child run per trial, synced).
Ray Tune runs the same trials (a `grid_search` of one CPU each) on the same Ray.

Per (trials, slots):
  efficiency    Σ trial time / (slots × makespan); makespan from the driver's `run()` call to the last
                trial's record in the store (MLflow's catch-up after it is reported apart)
  first trial   seconds from `run()` to the first trial's start
  slot time lost  the share of slots × makespan no trial used, split: before the first trial (head), while
                trials were being started (steady), after the last trial started (tail)
  CPU/trial     the driver process's CPU seconds (user + system) per trial, and of them the scheduling
                loop's (`loop ms`: the thread that claims, submits and records; the rest is MLflow's threads,
                Ray's and the imports); its peak memory (RSS)
  queries       state-store statements per trial (every cursor execution in the driver)
  MLflow calls  HTTP requests to the MLflow server per trial, from the driver
  MLflow lag    the most trials ended but not yet synced to their child run, and how long after the last
                trial the last child run was synced (catch-up)

Each slot's Ray worker process is started before `run()` (warm-up tasks that hold every slot at once; Ray
starts two at a time, and 64 take tens of seconds on two cores, which a cluster's many machines spread).

Bare Ray tasks (the same sleeps, two per slot in flight, nothing recorded) give the floor in each case.

Modes: the default measures one case (`--trials`, `--slots`); `--sweep` measures every trials × slots case
of SWEEP. The last line: `trials=… slots=… ablate_eff=… tune_eff=… ratio=… bare_eff=…` (ratio: Ablate's
efficiency over Tune's).
  --faults      one grid whose driver is SIGKILLed 3 times (at each next fifth of the trials ended; started
                again at once) and whose MLflow server is SIGKILLed once; then the record: trials finished by
                exactly one attempt, run whole exactly once, and one complete child run each, read back.
  --drivers K   K driver processes, each a service over the same two grids: no trial claimed twice, the
                trials each driver ran, each grid's share of the slots; then claim throughput under
                contention (K processes claiming the same queued trials in batches of 64).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VENV_BIN = Path(sys.executable).parent
NAMESPACE = ["unshare", "-n", "-p", "-f", "--mount-proc", "--kill-child"]
INSIDE = "ABLATE_SCALE_INSIDE"  # set once the bench runs in its own namespaces
HEAD_PORT = 6379
SWEEP = [(1000, 8), (1000, 32), (1000, 64), (10000, 8), (10000, 32), (10000, 64)]
VARIANTS = ["original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact"]  # the paper's table 2
TRIAL_S = 1.0  # the placeholder's sleep; `drive` sets it from --trial-s before Ray ships the function


def placeholder_trial(task: dict) -> dict:
    """A trial that only takes time, kept like a real one: a result.json in its checkpoint folder is its
    record, written whole or not at all, so a trial that ended before its driver died is not run again
    (workers/trainer.py does the same)."""
    from workers.checkpoint import write_result
    folder = Path(task["checkpoint_dir"])
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    began, start = time.time(), time.perf_counter()
    time.sleep(TRIAL_S)
    result = {"status": "finished", "test_error": 50.0, "train_loss": 1.0, "train_error": 50.0, "history": [],
              "iterations": 1, "resumed_from": None, "took": time.perf_counter() - start, "began": began,
              "ended": time.time()}
    folder.mkdir(parents=True, exist_ok=True)
    write_result(folder, result)
    # after its record: the fault run counts the executions that ended in one, per trial
    with open(folder / "completions", "a") as log:
        log.write(f"{os.getpid()}\n")
    return result


def grid_spec(name: str, trials: int, width: int = 4) -> dict:
    """A grid of `trials` placeholders; grids of another `width` hold other trials (a trial is its configuration)."""
    return {"name": name, "dataset": "synthetic", "recipe": "smoke", "depths": [8], "block": "basic", "width": width,
            "variants": VARIANTS, "seeds": trials // len(VARIANTS), "resources": {"cpu": 1}}


def hold_slot(folder: str, slots: int) -> int:
    """A warm-up task: holds its slot until every slot runs one, so each has a worker process of its own."""
    Path(folder, str(os.getpid())).touch()
    deadline = time.time() + 600
    while len(os.listdir(folder)) < slots and time.time() < deadline:
        time.sleep(0.05)
    return os.getpid()


def warm_slots(slots: int) -> float:
    """Start a Ray worker process for every slot of this job (Ray starts two at a time; tasks shorter than that
    would be served by the first few) before anything is timed; returns the seconds it took."""
    import ray
    start = time.time()
    folder = tempfile.mkdtemp(prefix="warm-")
    pids = ray.get([ray.remote(hold_slot).options(num_cpus=1).remote(folder, slots) for _ in range(slots)])
    shutil.rmtree(folder, ignore_errors=True)
    if len(set(pids)) < slots:
        raise RuntimeError(f"only {len(set(pids))} of {slots} slots got a worker within 600 s")
    return time.time() - start


# ------------------------------------------------------------------------------------------- the driver
class Counters:
    """State-store statements and MLflow HTTP requests made by this process, counted where they leave it."""

    def __init__(self):
        import requests
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        self.queries = self.mlflow_calls = 0
        self._lock = threading.Lock()

        def query(*_args, **_kw) -> None:
            with self._lock:
                self.queries += 1
        event.listen(Engine, "before_cursor_execute", query)
        send = requests.Session.request

        def request(session, *args, **kw):
            with self._lock:
                self.mlflow_calls += 1
            return send(session, *args, **kw)
        requests.Session.request = request


def drive(args: argparse.Namespace) -> None:
    """One driver process: warm its slots, then run the grids (one GridRunner, or a service over several)."""
    global TRIAL_S
    TRIAL_S = args.trial_s
    counters = Counters()
    import ray

    from orchestrator.cluster import ensure_ray
    from orchestrator.grids import load_grid
    from orchestrator.scheduler import GridRunner
    from orchestrator.service import GridService
    ensure_ray()
    slots = int(ray.cluster_resources()["CPU"])
    out = {"pid": os.getpid(), "warm_s": warm_slots(slots)}
    specs = [load_grid(json.loads(Path(g).read_text())) for g in args.grid]
    before = resource.getrusage(resource.RUSAGE_SELF)
    loop_before = time.thread_time()  # this thread runs the scheduling loop; MLflow's threads are the rest
    q0, m0 = counters.queries, counters.mlflow_calls
    out["t0"] = time.time()
    if len(specs) == 1:
        summary = GridRunner(trial_fn=placeholder_trial, progress=False).run(specs[0])
        out["summaries"] = [summary]
    else:  # several grids at once, as `ablate serve` runs them: the service's monitor and runners
        service = GridService(trial_fn=placeholder_trial)
        ids = [service.submit(spec) for spec in specs]
        service.start()
        while any(service.has_work(g) for g in ids) or service.active_count() > 1 or any(
                t.is_alive() for t in service._running.values()):
            time.sleep(0.5)
        service.stop()
        out["summaries"] = [{"grid": g} for g in ids]
    out["t1"] = time.time()
    after = resource.getrusage(resource.RUSAGE_SELF)
    out.update(cpu_s=after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
               loop_cpu_s=time.thread_time() - loop_before,
               peak_rss_mb=after.ru_maxrss / 1024, queries=counters.queries - q0,
               mlflow_calls=counters.mlflow_calls - m0)
    Path(args.out).write_text(json.dumps(out, default=str))


# ------------------------------------------------------------------------------------------ the cluster
class Cluster:
    """PostgreSQL, an MLflow server on it, and a Ray head of SLOTS logical CPUs, all on loopback."""

    def __init__(self, workdir: Path, scratch: Path):
        from tests.conftest import MlflowServer
        from tests.postgres import Postgres
        self.workdir, self.scratch = workdir, scratch
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = Postgres(scratch / "pg", 5432)
        self.mlflow = MlflowServer(workdir, backend=None, workers=2)
        self.head = None
        self.ray_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                        "RAY_TMPDIR": str(scratch / "ray")}

    def start(self) -> None:
        self.pg.start()
        self.state_url = self.pg.create_database("ablate")
        self.mlflow.backend = self.pg.create_database("mlflow")
        self.mlflow.start()

    def start_ray(self, slots: int) -> None:
        from tests.cluster_scenario import Node
        self.stop_ray()
        env = {**os.environ, **self.ray_env}
        self.head = Node("head", ["--head", "--port", str(HEAD_PORT), "--num-cpus", str(slots),
                                  "--include-dashboard", "false", "--temp-dir", str(self.scratch / "ray" / "h")],
                         env, self.logs)
        self.head.wait_started(300)
        self.slots = slots

    def stop_ray(self) -> None:
        if self.head is not None:
            self.head.kill()
            self.head = None

    def env(self, home: Path) -> dict[str, str]:
        return {**os.environ, **self.ray_env, "RAY_ADDRESS": f"127.0.0.1:{HEAD_PORT}", "ABLATE_STATE_URL": self.state_url,
                "MLFLOW_TRACKING_URI": self.mlflow.uri, "ABLATE_HOME": str(home),
                "ABLATE_CHECKPOINT_DIR": str(home / "checkpoints"), "ABLATE_MAX_TRIALS": "100000"}

    def stop(self) -> None:
        self.stop_ray()
        self.mlflow.stop()
        try:
            self.pg.stop()
        except Exception as exc:  # the namespace's end takes it down in any case
            print(f"pg_ctl stop: {exc}", file=sys.stderr)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class Driver:
    """A `scale.py drive` process in a session of its own (so SIGKILL takes every thread and child with it)."""

    def __init__(self, cluster: Cluster, home: Path, grids: list[Path], trial_s: float, name: str):
        self.out = cluster.workdir / f"{name}.json"
        log = open(cluster.logs / f"{name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, "drive", "--trial-s", str(trial_s), "--out",
                                      str(self.out), *[a for g in grids for a in ("--grid", str(g))]],
                                     cwd=ROOT, env=cluster.env(home), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait(self, timeout: float | None = None) -> dict:
        rc = self.proc.wait(timeout)
        if rc != 0:
            raise RuntimeError(f"the driver exited with {rc}; see {self.out.with_suffix('.log').name}")
        return json.loads(self.out.read_text())

    def kill(self) -> None:
        from tests.e2e.scenario import kill_session
        kill_session(self.proc.pid)
        self.proc.wait()


class Lag:
    """Samples the store once a second: trials ended, and ended but not yet synced to MLflow."""

    def __init__(self, store, grid_ids: list[str]):
        self.store, self.grid_ids, self.samples = store, grid_ids, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        from sqlalchemy import text
        query = text("SELECT count(*) FILTER (WHERE t.status IN ('finished', 'diverged', 'error')), "
                     "count(*) FILTER (WHERE t.status IN ('finished', 'diverged', 'error') AND NOT t.mlflow_synced) "
                     "FROM ablate_grid_trials g JOIN ablate_trials t ON t.key = g.trial_key WHERE g.grid_id = ANY(:ids)")
        while not self._stop.is_set():
            with self.store.engine.connect() as conn:
                ended, behind = conn.execute(query, {"ids": self.grid_ids}).one()
            self.samples.append((time.time(), ended, behind))
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure_ablate(cluster: Cluster, trials: int, trial_s: float, tag: str, width: int) -> dict:
    """One grid of `trials` placeholder trials through one driver process, on fresh state (trials of their own:
    each case of a sweep has its own `width`)."""
    from orchestrator.grids import load_grid
    from orchestrator.state import StateStore
    home = cluster.workdir / f"home-{tag}"
    spec = grid_spec(f"scale-{tag}", trials, width)
    grid_file = cluster.workdir / f"grid-{tag}.json"
    grid_file.write_text(json.dumps(spec))
    store = StateStore(cluster.state_url)
    grid_id = load_grid(spec).grid_id()
    lag = Lag(store, [grid_id])
    began_load = load()
    driver = Driver(cluster, home, [grid_file], trial_s, f"driver-{tag}")
    out = driver.wait()
    lag.stop()
    return {**summarise(store, [grid_id], out, lag, cluster.slots), "load_before": began_load, "load_after": load()}


def summarise(store, grid_ids: list[str], out: dict, lag: Lag, slots: int) -> dict:
    """Efficiency, first trial, MLflow lag and catch-up from the store's records and the driver's counters."""
    from sqlalchemy import text
    with store.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.result, (SELECT max(a.ended_at) FROM ablate_attempts a WHERE a.trial_key = t.key "
            "AND a.outcome = 'finished') FROM ablate_grid_trials g JOIN ablate_trials t ON t.key = g.trial_key "
            "WHERE g.grid_id = ANY(:ids)"), {"ids": grid_ids}).all()
    results = [json.loads(r) for r, _ in rows if r]
    recorded = [e for _, e in rows if e is not None]
    n = len(rows)
    busy = sum(r["took"] for r in results)
    makespan = max(recorded) - out["t0"]
    ended_at = max(recorded)
    synced_at = next((t for t, ended, behind in lag.samples if ended == n and behind == 0), None)
    # Where the slot-seconds went that no trial used: before the first trial, while trials were still being
    # started (the steady state), and after the last one started (the tail, which bare Ray has too).
    capacity = slots * makespan
    first, last_start = min(r["began"] for r in results), max(r["began"] for r in results)
    tail_busy = sum(max(0.0, min(r["ended"], ended_at) - max(r["began"], last_start)) for r in results)
    lost = {"head": slots * (first - out["t0"]), "tail": slots * (ended_at - last_start) - tail_busy}
    lost["steady"] = capacity - busy - lost["head"] - lost["tail"]
    return {"lost": {k: round(v / capacity, 4) for k, v in lost.items()}, "trials": n, "finished": len(results), "slots": slots, "busy_s": busy, "makespan_s": makespan,
            "efficiency": busy / (slots * makespan), "first_trial_s": min(r["began"] for r in results) - out["t0"],
            "cpu_per_trial_ms": 1000 * out["cpu_s"] / n, "loop_cpu_per_trial_ms": 1000 * out["loop_cpu_s"] / n,
            "peak_rss_mb": out["peak_rss_mb"],
            "queries_per_trial": out["queries"] / n, "mlflow_calls_per_trial": out["mlflow_calls"] / n,
            "mlflow_max_behind": max((b for _, _, b in lag.samples), default=0),
            "mlflow_catch_up_s": None if synced_at is None else max(0.0, synced_at - ended_at),
            "driver_returned_after_s": out["t1"] - ended_at, "warm_s": out["warm_s"]}


# ----------------------------------------------------------------------------------------------- faults
def ended_count(store, grid_id: str) -> int:
    from ablations.vocabulary import ENDED
    counts = store.counts(grid_id)
    return sum(counts[s] for s in ENDED)


def wait_ended(store, grid_id: str, n: int, driver: "Driver") -> None:
    """Until `n` trials of the grid have their record (the event each fault waits on)."""
    while ended_count(store, grid_id) < n:
        if driver.proc.poll() is not None:
            raise RuntimeError(f"the driver exited with {driver.proc.returncode} before {n} trials ended")
        time.sleep(0.2)


def measure_faults(cluster: Cluster, trials: int, trial_s: float, kills: int = 3) -> dict:
    """One grid through a driver SIGKILLed `kills` times (each at the next quarter of the trials ended, and at
    once started again) and an MLflow server SIGKILLed once (started again after another tenth ended). Then the
    record: every trial finished by exactly one attempt, run whole exactly once (its placeholder's count), and
    exactly one complete child run per trial in MLflow, read back from the server."""
    from mlflow import MlflowClient
    from sqlalchemy import text

    from orchestrator.grids import load_grid
    from orchestrator.state import StateStore
    home = cluster.workdir / "home-faults"
    spec = grid_spec("scale-faults", trials)
    grid_file = cluster.workdir / "grid-faults.json"
    grid_file.write_text(json.dumps(spec))
    store = StateStore(cluster.state_url)
    grid_id = load_grid(spec).grid_id()
    events, start = [], time.time()
    driver = Driver(cluster, home, [grid_file], trial_s, "driver-faults-0")
    marks = [trials * (i + 1) // (kills + 2) for i in range(kills)]
    mlflow_down, mlflow_up = (marks[-1] + trials // (kills + 2) // 2), None
    for i, mark in enumerate(marks, 1):
        wait_ended(store, grid_id, mark, driver)
        driver.kill()
        events.append((round(time.time() - start, 1), f"driver SIGKILL at {ended_count(store, grid_id)} ended"))
        driver = Driver(cluster, home, [grid_file], trial_s, f"driver-faults-{i}")
    wait_ended(store, grid_id, mlflow_down, driver)
    os.killpg(cluster.mlflow.proc.pid, signal.SIGKILL)
    cluster.mlflow.proc.wait()
    events.append((round(time.time() - start, 1), f"MLflow SIGKILL at {ended_count(store, grid_id)} ended"))
    mlflow_up = min(trials, mlflow_down + trials // 10)
    wait_ended(store, grid_id, mlflow_up, driver)
    cluster.mlflow.start()
    events.append((round(time.time() - start, 1), f"MLflow up again at {ended_count(store, grid_id)} ended"))
    out = driver.wait()
    unsynced = out["summaries"][0].get("mlflow_unsynced")
    events.append((round(time.time() - start, 1), f"driver returned: {unsynced} MLflow runs unsynced"))
    if unsynced:  # MLflow came back after the driver's last try: the same command again, as its user would
        out = Driver(cluster, home, [grid_file], trial_s, "driver-faults-again").wait()
        events.append((round(time.time() - start, 1),
                       f"the same command again: {out['summaries'][0].get('mlflow_unsynced')} unsynced"))

    with store.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT t.key, t.status, t.attempts, t.mlflow_run_id, (SELECT count(*) FROM ablate_attempts a WHERE "
            "a.trial_key = t.key AND a.outcome = 'finished') FROM ablate_grid_trials g JOIN ablate_trials t ON "
            "t.key = g.trial_key WHERE g.grid_id = :g"), {"g": grid_id}).all()
    completions = {}
    for key, *_ in rows:
        log = home / "checkpoints" / key / "completions"
        completions[key] = len(log.read_text().splitlines()) if log.exists() else 0
    client = MlflowClient(cluster.mlflow.uri)
    experiment = client.get_experiment_by_name(spec["name"])
    runs, token = [], None
    while True:
        page = client.search_runs([experiment.experiment_id], "tags.`ablate.trial` != ''", max_results=1000,
                                  page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    per_key: dict[str, list] = {}
    for run in runs:
        per_key.setdefault(run.data.tags["ablate.trial"], []).append(run)
    held = {key: run_id for key, _, _, run_id, _ in rows}
    complete = sum(1 for key, got in per_key.items() if len(got) == 1 and got[0].info.status == "FINISHED"
                   and got[0].info.run_id == held.get(key) and got[0].data.tags.get("ablate.status") == "finished")
    return {"trials": len(rows), "events": events,
            "finished": sum(1 for r in rows if r[1] == "finished"),
            "finished_once": sum(1 for r in rows if r[4] == 1),
            "run_once": sum(1 for n in completions.values() if n == 1),
            "run_twice_or_more": sum(1 for n in completions.values() if n > 1),
            "attempts_over_one": sum(1 for r in rows if r[2] > 1),
            "child_runs": len(runs), "child_runs_complete": complete,
            "trials_without_run": sum(1 for key in held if key not in per_key)}


# ------------------------------------------------------------------------------------- several drivers
def measure_drivers(cluster: Cluster, trials: int, trial_s: float, drivers: int = 2) -> dict:
    """`drivers` driver processes, each a service over the same two grids of trials/2 (the state on one
    PostgreSQL, one Ray): every trial must be claimed and finished once; the trials each driver ran, each grid's
    share of the slot time while both had work, claims per second, and the efficiency of all of it."""
    from sqlalchemy import text

    from orchestrator.grids import load_grid
    from orchestrator.state import StateStore
    store = StateStore(cluster.state_url)
    files, ids = [], []
    for width, name in ((5, "scale-drivers-a"), (6, "scale-drivers-b")):
        spec = grid_spec(name, trials // 2, width)
        files.append(cluster.workdir / f"{name}.json")
        files[-1].write_text(json.dumps(spec))
        ids.append(load_grid(spec).grid_id())
    home = cluster.workdir / "home-drivers"
    began_load = load()
    procs = [Driver(cluster, home, files, trial_s, f"driver-{i}") for i in range(drivers)]
    outs = [p.wait() for p in procs]
    with store.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT g.grid_id, t.key, t.result, (SELECT count(*) FROM ablate_attempts a WHERE a.trial_key = t.key), "
            "(SELECT min(a.owner) FROM ablate_attempts a WHERE a.trial_key = t.key AND a.outcome = 'finished'), "
            "(SELECT count(*) FROM ablate_attempts a WHERE a.trial_key = t.key AND a.outcome = 'finished') "
            "FROM ablate_grid_trials g JOIN ablate_trials t ON t.key = g.trial_key WHERE g.grid_id = ANY(:ids)"),
            {"ids": ids}).all()
        claims = conn.execute(text("SELECT min(started_at), max(started_at), count(*) FROM ablate_attempts a JOIN "
                                   "ablate_grid_trials g ON g.trial_key = a.trial_key WHERE g.grid_id = ANY(:ids)"),
                              {"ids": ids}).one()
    results = [(grid, json.loads(r)) for grid, _, r, *_ in rows if r]
    by_pid = {str(o["pid"]): 0 for o in outs}
    for *_, owner, _ in rows:
        pid = owner.split(":")[1] if owner else "none"
        by_pid[pid] = by_pid.get(pid, 0) + 1
    t0 = min(o["t0"] for o in outs)
    ends = {g: max(r["ended"] for grid, r in results if grid == g) for g in ids}
    both_until = min(ends.values())  # the window in which both grids had trials to run
    share = {g: sum(max(0.0, min(r["ended"], both_until) - max(r["began"], t0)) for grid, r in results if grid == g)
             for g in ids}
    busy = sum(r["took"] for _, r in results)
    makespan = max(ends.values()) - t0
    return {"trials": len(rows), "finished": len(results), "slots": cluster.slots,
            "claimed_once": sum(1 for r in rows if r[3] == 1), "finished_once": sum(1 for r in rows if r[5] == 1),
            "trials_per_driver": list(by_pid.values()),
            "grid_share": [round(share[g] / max(1e-9, sum(share.values())), 3) for g in ids],
            "claims_per_s": round(claims[2] / max(1e-9, claims[1] - claims[0]), 1),
            "efficiency": round(busy / (cluster.slots * makespan), 3), "makespan_s": round(makespan, 1),
            "load_before": began_load, "load_after": load()}


def claim(args: argparse.Namespace) -> None:
    """One claiming process: from `start_at`, claim_many over every key in batches of `batch`, in order (so
    contenders fight over the same rows); writes what it took and how long it took."""
    from orchestrator.state import StateStore
    store = StateStore(os.environ["ABLATE_STATE_URL"])
    keys = json.loads(Path(args.keys).read_text())
    owner = f"claimer-{os.getpid()}"
    store.claim_many(keys[:0], owner)  # connected before the start
    time.sleep(max(0.0, args.start_at - time.time()))
    start, taken = time.perf_counter(), []
    for i in range(0, len(keys), args.batch):
        taken += store.claim_many(keys[i:i + args.batch], owner)
    Path(args.out).write_text(json.dumps({"taken": taken, "seconds": time.perf_counter() - start}))


def measure_claims(cluster: Cluster, trials: int, procs: int = 2, batch: int = 64) -> dict:
    """Claim throughput under contention: `procs` processes claim the same `trials` queued trials, in the same
    order, in batches of `batch` (as a driver claims for its free slots). Every trial must be taken once."""
    from orchestrator.grids import expand_grid, load_grid
    from orchestrator.state import StateStore
    spec = load_grid(grid_spec("scale-claims", trials, width=7))
    store = StateStore(cluster.state_url)
    rows = expand_grid(spec)
    store.register_grid(spec.grid_id(), spec.name, spec.model_dump(mode="json", by_alias=True), rows)
    keys_file = cluster.workdir / "claim-keys.json"
    keys_file.write_text(json.dumps([t.key for t in rows]))
    start_at = time.time() + 15  # every process imported and connected by then
    outs = [cluster.workdir / f"claim-{i}.json" for i in range(procs)]
    children = [subprocess.Popen([sys.executable, __file__, "claim", "--keys", str(keys_file), "--out", str(o),
                                  "--batch", str(batch), "--start-at", str(start_at)], cwd=ROOT, env=cluster.env(
                                      cluster.workdir / "home-claims")) for o in outs]
    if any(c.wait() for c in children):
        raise RuntimeError("a claiming process failed")
    got = [json.loads(o.read_text()) for o in outs]
    taken = [k for g in got for k in g["taken"]]
    return {"trials": len(rows), "processes": procs, "batch": batch, "taken": len(taken),
            "taken_twice": len(taken) - len(set(taken)), "per_process": [len(g["taken"]) for g in got],
            "claims_per_s": round(len(taken) / max(g["seconds"] for g in got), 1)}


# --------------------------------------------------------------------------------------------- bare Ray
def bare_trial(trial_s: float) -> float:
    start = time.perf_counter()
    time.sleep(trial_s)
    return time.perf_counter() - start


def measure_bare(cluster: Cluster, trials: int, trial_s: float) -> dict:
    """The floor: the same sleeps as plain Ray tasks, two per slot in flight as Ablate keeps them, nothing
    recorded; slots' workers warmed first, as for Ablate."""
    import ray
    ray.init(address=f"127.0.0.1:{HEAD_PORT}", log_to_driver=False)
    try:
        task = ray.remote(bare_trial).options(num_cpus=1)
        warm_slots(cluster.slots)
        began_load = load()
        start = time.perf_counter()
        busy, left, inflight = 0.0, trials, []
        while left or inflight:
            while left and len(inflight) < 2 * cluster.slots:
                inflight.append(task.remote(trial_s))
                left -= 1
            done, inflight = ray.wait(inflight, num_returns=1)
            busy += sum(ray.get(done))
        makespan = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"trials": trials, "finished": trials, "slots": cluster.slots, "makespan_s": makespan, "busy_s": busy,
            "efficiency": busy / (cluster.slots * makespan), "load_before": began_load, "load_after": load()}


# --------------------------------------------------------------------------------------------- Ray Tune
def tune_trainable(config: dict) -> dict:
    start = time.perf_counter()
    time.sleep(config["trial_s"])
    return {"took": time.perf_counter() - start}


def measure_tune(cluster: Cluster, trials: int, trial_s: float, cap_s: float) -> dict:
    """The same placeholder trials as a Tune grid_search on the same Ray; stopped after `cap_s` (Tune's own
    time budget), in which case only the trials it finished count."""
    import ray
    from ray import tune
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ray.init(address=f"127.0.0.1:{HEAD_PORT}", log_to_driver=False)
    try:
        tuner = tune.Tuner(tune.with_resources(tune_trainable, {"cpu": 1}),
                           param_space={"seed": tune.grid_search(list(range(trials))), "trial_s": trial_s},
                           tune_config=tune.TuneConfig(time_budget_s=cap_s),
                           run_config=tune.RunConfig(storage_path=str(cluster.workdir / "tune"), name="scale",
                                                     verbose=0))
        began_load = load()
        start = time.perf_counter()
        results = tuner.fit()
        makespan = time.perf_counter() - start
        done = [r for r in results if r.metrics and "took" in r.metrics]
    finally:
        ray.shutdown()
    busy = sum(r.metrics["took"] for r in done)
    return {"trials": trials, "finished": len(done), "makespan_s": makespan, "busy_s": busy,
            "efficiency": busy / (cluster.slots * makespan), "capped": len(done) < trials,
            "load_before": began_load, "load_after": load()}


# ------------------------------------------------------------------------------------------------ main
def wait_for_quiet(limit_s: float = 600, below: float = 3.0) -> None:
    """Other work shares this machine: wait (up to `limit_s`) for a load average below `below`."""
    deadline = time.time() + limit_s
    while os.getloadavg()[0] >= below and time.time() < deadline:
        time.sleep(10)


def row(name: str, r: dict) -> str:
    return (f"{name:10} {r['trials']:>7} {r['slots']:>5} {r['efficiency']:>6.3f} {r['makespan_s']:>9.1f} "
            f"{r.get('first_trial_s', float('nan')):>7.2f} {r.get('cpu_per_trial_ms', float('nan')):>8.2f} "
            f"{r.get('loop_cpu_per_trial_ms', float('nan')):>7.2f} "
            f"{r.get('queries_per_trial', float('nan')):>8.2f} {r.get('mlflow_calls_per_trial', float('nan')):>7.2f} "
            f"{r.get('mlflow_max_behind', 0):>7} {r.get('mlflow_catch_up_s') or 0:>8.1f} "
            f"{r.get('peak_rss_mb', float('nan')):>7.0f}  {r['load_before']} → {r['load_after']}")


HEADER = (f"{'':10} {'trials':>7} {'slots':>5} {'eff':>6} {'makespan':>9} {'first s':>7} {'CPU ms':>8} {'loop ms':>7} "
          f"{'queries':>8} {'mlflow':>7} {'behind':>7} {'catchup':>8} {'RSS MB':>7}  load before → after")


def inside(args: argparse.Namespace) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="scale-", dir="/tmp"))  # short: sockets; `postgres` may enter
    os.chmod(scratch, 0o755)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ablate-scale-"))
    cluster = Cluster(workdir, scratch)
    os.environ.update(cluster.ray_env)  # before anything imports Ray: its token is read once per process
    report: dict = {"args": vars(args), "cases": []}
    try:
        cluster.start()
        if args.faults:
            cluster.start_ray(args.slots)
            got = measure_faults(cluster, args.trials, args.trial_s)
            report["faults"] = got
            for at, what in got["events"]:
                print(f"{at:8.1f} s  {what}", flush=True)
            print(" ".join(f"{k}={v}" for k, v in got.items() if k != "events"), flush=True)
            return
        if args.drivers > 1:
            cluster.start_ray(args.slots)
            got = measure_drivers(cluster, args.trials, args.trial_s, args.drivers)
            report["drivers"] = got
            print(" ".join(f"{k}={v}" for k, v in got.items()), flush=True)
            claims = measure_claims(cluster, args.trials, args.drivers)
            report["claims"] = claims
            print("claims: " + " ".join(f"{k}={v}" for k, v in claims.items()), flush=True)
            return
        cases = SWEEP if args.sweep else [(args.trials, args.slots)]
        print(HEADER, flush=True)
        last = None
        for case, (trials, slots) in enumerate(cases):
            cluster.start_ray(slots)
            if args.quiet:
                wait_for_quiet()
            bare = measure_bare(cluster, trials, args.trial_s) if args.bare else None
            if bare:
                print(row("bare Ray", bare), flush=True)
            got = measure_ablate(cluster, trials, args.trial_s, f"{trials}x{slots}", width=10 + case)
            print(row("Ablate", got), flush=True)
            print("           slot time lost " + ", ".join(f"{k} {v:.3f}" for k, v in got["lost"].items()), flush=True)
            tune_got = None
            if args.tune_trials:
                tune_trials = min(trials, args.tune_trials)
                tune_got = {**measure_tune(cluster, tune_trials, args.trial_s, args.tune_cap_s), "slots": slots}
                print(row("Ray Tune", tune_got), flush=True)
            report["cases"].append({"ablate": got, "tune": tune_got, "bare": bare})
            last = (trials, slots, got, tune_got, bare)
        trials, slots, got, tune_got, bare = last
        tune_eff = tune_got["efficiency"] if tune_got else float("nan")
        print(f"trials={trials} slots={slots} trial_s={args.trial_s} ablate_eff={got['efficiency']:.3f} "
              f"tune_eff={tune_eff:.3f} ratio={got['efficiency'] / tune_eff:.2f}"
              + (f" tune_trials={tune_got['finished']}/{tune_got['trials']}" if tune_got else "")
              + (f" bare_eff={bare['efficiency']:.3f}" if bare else ""), flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        (workdir / "report.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"report: {workdir / 'report.json'}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("drive", help="one driver process (started by the bench)")
    d.add_argument("--grid", action="append", required=True)
    d.add_argument("--trial-s", type=float, required=True)
    d.add_argument("--out", required=True)
    c = sub.add_parser("claim", help="one claiming process (started by the bench)")
    c.add_argument("--keys", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--batch", type=int, required=True)
    c.add_argument("--start-at", type=float, required=True)
    parser.add_argument("--trials", type=int, default=10000)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--trial-s", type=float, default=TRIAL_S)
    parser.add_argument("--sweep", action="store_true", help=f"every (trials, slots) of {SWEEP}")
    parser.add_argument("--tune-trials", type=int, default=1000, help="Tune runs min(trials, this); 0: no Tune")
    parser.add_argument("--tune-cap-s", type=float, default=900, help="Tune's time budget per case")
    parser.add_argument("--faults", action="store_true",
                        help="the fault run: the driver SIGKILLed 3 times and MLflow once during one grid")
    parser.add_argument("--drivers", type=int, default=1,
                        help="K > 1: K driver processes, each a service over the same two grids of trials/2")
    parser.add_argument("--no-bare", dest="bare", action="store_false", help="skip the bare-Ray floor")
    parser.add_argument("--quiet", action="store_true", help="wait for a load average below 3 before each case")
    parser.add_argument("--workdir", help="where logs and report.json go (default: a new temporary folder)")
    args = parser.parse_args()
    if args.command == "drive":
        drive(args)
    elif args.command == "claim":
        claim(args)
    elif os.environ.get(INSIDE):
        inside(args)
    else:  # again, in namespaces of its own: loopback only, and nothing it starts outlives it
        script = 'ip link set lo up && "$0" "$@"; rc=$?; exit $rc'  # bash stays the namespace's init
        env = {**os.environ, INSIDE: "1"}
        for var in ("RAY_ADDRESS", "ABLATE_STATE_URL", "MLFLOW_TRACKING_URI", "ABLATE_CHECKPOINT_DIR", "ABLATE_HOME"):
            env.pop(var, None)
        sys.exit(subprocess.call([*NAMESPACE, "bash", "-c", script, sys.executable, __file__, *sys.argv[1:]],
                                 env=env))


if __name__ == "__main__":
    main()
