"""The deployed topology of docker-compose.yml on one machine, with faults: the scenario of test_distributed.

Run by tests/e2e/test_distributed.py inside its own network and PID namespaces (`unshare -n -p -f
--mount-proc --kill-child`): all traffic stays on loopback, and every process started here (Postgres,
the MLflow server, three Ray nodes, `ablate serve`) dies with the namespace whatever happens.
Usage: `scenario.py WORKDIR SCRATCH` (SCRATCH: a short folder under /tmp, traversable by `postgres`, for
the database cluster and Ray's socket paths).

Topology: PostgreSQL 15 (databases `ablate` and `mlflow`), `mlflow server` on Postgres with served
artifacts, a Ray head with no CPUs and two one-CPU worker nodes (`ray start`, token auth), `ablate serve`
on all of them. A 2 variants x 2 seeds grid is submitted with `ablate submit --server`; while it runs:
(a) SIGKILL every process of a Ray worker node that executes a trial (in the second wave, so that Ray's
own retry is the next task on the surviving node, and it trains there before (b)); (b) SIGKILL
`ablate serve` and start it again; (c) SIGKILL the MLflow server for OUTAGE_S seconds, then start it
again on the same port and database. Afterwards the facts (state store, MLflow run tree and metric
histories, the HTTP comparison) go to WORKDIR/report.json with the counts computed by `analyse`; the
assertions are the test's.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.cluster_scenario import Node, exited, newest_checkpoint, session_pids, wait  # noqa: E402
from tests.postgres import Postgres  # noqa: E402

VENV_BIN = Path(sys.executable).parent
PG_PORT, MLFLOW_PORT, HEAD_PORT, SERVE_PORT = 5432, 5000, 6379, 8600  # a private network namespace
ITERATIONS = 200
KILL_AFTER_ITERATION = 30  # both running trials past an evaluation (25) and a checkpoint when the node dies
OUTAGE_S = 30.0
METRICS = ("train_loss", "train_error", "test_error")
GRID = {"name": "e2e-distributed", "dataset": "synthetic", "subset": 512, "depths": [8], "block": "basic",
        "width": 4, "variants": ["original", "full_preact"], "seeds": 2, "max_retries": 3,
        "recipe": {"base": "smoke", "iterations": ITERATIONS, "checkpoint_every": 5, "eval_every": 25,
                   "milestones": [ITERATIONS * 3 // 4]}}
CONTRACT_TAGS = ("ablate.grid", "ablate.trial", "ablate.variant", "ablate.unit", "ablate.shortcut", "ablate.depth",
                 "ablate.dataset", "ablate.seed", "ablate.status")


def log(msg: str, t0: float = time.time()) -> None:
    print(f"[e2e {time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def http_get(url: str, timeout: float = 60):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout:g} s")


def kill_session(sid: int) -> list[int]:
    """SIGKILL every process of a session (twice over, in case one forked meanwhile)."""
    killed: set[int] = set()
    for _ in range(2):
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
    return sorted(killed)


class Server:
    """A server process in a session of its own (so every process it forks can be killed with it)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logs: Path, health: str):
        self.name, self.argv, self.env, self.logs, self.health = name, argv, env, logs, health
        self.proc: subprocess.Popen | None = None

    def spawn(self) -> None:
        out = open(self.logs / f"{self.name}.log", "ab")
        out.write(f"\n==== start {time.strftime('%H:%M:%S')} ====\n".encode())
        out.flush()
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_up(self, timeout: float) -> None:
        wait_http(self.health, timeout, self.proc)

    def start(self, timeout: float) -> None:
        self.spawn()
        self.wait_up(timeout)

    def kill(self) -> list[int]:
        if self.proc is None:
            return []
        killed = kill_session(self.proc.pid)
        self.proc.wait()
        return killed


def executing(node: Node) -> list[int]:
    """PIDs of the node's Ray workers that execute a trial now (Ray titles them `ray::execute_trial`)."""
    found = []
    for pid in session_pids(node.sid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::execute_trial"):
            found.append(pid)
    return found


# ---------------------------------------------------------------------------------------------- analysis
def same(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def analyse(facts: dict) -> dict:
    """Counts from the collected facts: trials lost and duplicated, metric points lost, run tree problems."""
    trials, runs = facts["trials"], facts["mlflow_runs"]
    grid_id = facts["grid_id"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    children = [r for r in runs if "mlflow.parentRunId" in r["tags"]]
    problems: list[str] = []
    if len(parents) != 1:
        problems.append(f"{len(parents)} parent runs tagged ablate.grid={grid_id}")
    parent_id = parents[0]["run_id"] if parents else None
    if parents and parents[0]["status"] != "FINISHED":
        problems.append(f"parent run status {parents[0]['status']}")
    by_key: dict[str, list[dict]] = {}
    for run in children:
        by_key.setdefault(run["tags"].get("ablate.trial"), []).append(run)
        if run["tags"]["mlflow.parentRunId"] != parent_id:
            problems.append(f"child run {run['run_id']} has another parent")
    lost = [k for k, t in trials.items() if t["status"] != "finished"]
    duplicated = sorted({k for k, t in trials.items() if sum(a["outcome"] == "finished" for a in t["attempts"]) > 1}
                        | {k for k, rs in by_key.items() if len(rs) > 1})
    missing_runs = sorted(k for k in trials if k not in by_key)
    stray_runs = sorted(str(k) for k in by_key if k not in trials)
    expected = lost_points = mismatched = duplicate_points = 0
    per_metric_lost = dict.fromkeys(METRICS, 0)
    duplicate_steps: dict[str, list[int]] = {}
    for key, trial in trials.items():
        run = (by_key.get(key) or [None])[0]
        history = (trial["result"] or {}).get("history", [])
        if run is None:
            continue
        for tag in CONTRACT_TAGS:
            if tag not in run["tags"]:
                problems.append(f"{key[:12]}: tag {tag} missing")
        if run["tags"].get("ablate.grid") != grid_id or run["tags"].get("ablate.status") != trial["status"]:
            problems.append(f"{key[:12]}: tags ablate.grid/ablate.status {run['tags'].get('ablate.grid')}/"
                            f"{run['tags'].get('ablate.status')}")
        if run["status"] != "FINISHED":
            problems.append(f"{key[:12]}: child run status {run['status']}")
        if not run["n_params"]:
            problems.append(f"{key[:12]}: child run has no params")
        for metric in METRICS:
            want = [(h["step"], h[metric]) for h in history if h.get(metric) is not None]
            have = [(p["step"], p["value"]) for p in run["metrics"].get(metric, [])]
            expected += len(want)
            distinct: list[tuple[int, float]] = []
            for point in have:
                if any(point[0] == d[0] and same(point[1], d[1]) for d in distinct):
                    duplicate_points += 1
                    duplicate_steps.setdefault(key, []).append(point[0])
                else:
                    distinct.append(point)
            for step, value in want:
                if not any(step == s and same(value, v) for s, v in distinct):
                    lost_points += 1
                    per_metric_lost[metric] += 1
            mismatched += sum(1 for s, v in distinct if not any(s == ws and same(v, wv) for ws, wv in want))
        final = run["latest"].get("test_error")
        if final is None or trial["result"] is None or not same(final, trial["result"]["test_error"]):
            problems.append(f"{key[:12]}: last test_error {final} is not the result's")
    return {"trials": len(trials), "trials_finished": len(trials) - len(lost), "trials_lost": len(lost),
            "trials_duplicated": len(duplicated), "mlflow_parent_runs": len(parents),
            "mlflow_child_runs": len(children), "trials_without_child_run": len(missing_runs),
            "stray_child_runs": len(stray_runs), "metric_points_expected": expected, "metrics_lost": lost_points,
            "metrics_lost_by_name": per_metric_lost, "metric_points_mismatched": mismatched,
            "metric_points_duplicated": duplicate_points, "duplicate_steps": duplicate_steps,
            "run_tree_problems": problems}


# -------------------------------------------------------------------------------------------- scenario
def main(workdir: Path, scratch: Path) -> dict:
    t0 = time.time()
    report: dict = {"timings": {}, "faults": {}, "iterations": ITERATIONS}
    timings = report["timings"]
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pg = Postgres(scratch / "pg", PG_PORT)
    ray_tmp = scratch / "ray"  # short: Ray's socket paths
    home, ckpt_root = workdir / "home", workdir / "checkpoints"
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "ABLATE_STATE_URL", "MLFLOW_TRACKING_URI", "ABLATE_CHECKPOINT_DIR",
                         "ABLATE_TOKEN", "ABLATE_SERVER", "ABLATE_HOME")}
    ray_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_TMPDIR": str(ray_tmp),
               # A killed raylet is declared dead after ~5 s rather than Ray's ~15 s (as tests/cluster_scenario.py).
               "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000",
               "RAY_health_check_failure_threshold": "5"}
    mlflow_uri = f"http://127.0.0.1:{MLFLOW_PORT}"
    serve_url = f"http://127.0.0.1:{SERVE_PORT}"
    nodes: dict[str, Node] = {}
    servers: dict[str, Server] = {}
    samples: dict[str, list[tuple[float, int]]] = {}
    stop_sampling = threading.Event()
    try:
        # ---------------------------------------------------------------- the topology of docker-compose.yml
        pg.start()
        for db in ("ablate", "mlflow"):
            pg.create_database(db)
        timings["postgres_up"] = time.time() - t0
        log("postgres up (databases ablate, mlflow)")
        servers["mlflow"] = Server(
            "mlflow", [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
                       "--workers", "1", "--backend-store-uri", pg.url("mlflow"), "--serve-artifacts",
                       "--artifacts-destination", str(workdir / "mlartifacts")],
            base, logs, f"{mlflow_uri}/health")
        servers["mlflow"].spawn()  # its first start migrates the database: overlap it with Ray's start
        nodes["head"] = Node("head", ["--head", "--port", str(HEAD_PORT), "--num-cpus", "0",
                                      "--include-dashboard", "false", "--temp-dir", str(ray_tmp / "h")], ray_env, logs)
        nodes["head"].wait_started(180)
        log("ray head started")
        for name, port_base, short in (("worker-a", 20000, "a"), ("worker-b", 21000, "b")):
            ports = ["--node-manager-port", port_base + 1, "--object-manager-port", port_base + 2,
                     "--metrics-export-port", port_base + 3, "--dashboard-agent-listen-port", port_base + 4,
                     "--dashboard-agent-grpc-port", port_base + 5, "--runtime-env-agent-port", port_base + 6,
                     "--min-worker-port", port_base + 100, "--max-worker-port", port_base + 199]
            nodes[name] = Node(name, ["--address", f"127.0.0.1:{HEAD_PORT}", "--num-cpus", "1",
                                      "--temp-dir", str(ray_tmp / short), *map(str, ports)], ray_env, logs)
        for name in ("worker-a", "worker-b"):
            nodes[name].wait_started(180)
        log("ray worker nodes started")

        os.environ.clear()
        os.environ.update(ray_env, RAY_ADDRESS=f"127.0.0.1:{HEAD_PORT}", ABLATE_STATE_URL=pg.url("ablate"),
                          MLFLOW_TRACKING_URI=mlflow_uri)
        import ray
        from mlflow.tracking import MlflowClient

        from orchestrator.state import StateStore
        ray.init(address=f"127.0.0.1:{HEAD_PORT}", log_to_driver=False)  # an observer: ray.nodes()

        def alive() -> set[str]:
            return {n["NodeName"] for n in ray.nodes() if n["Alive"]}

        wait(lambda: alive() == {"head", "worker-a", "worker-b"}, 120, "three alive Ray nodes")
        report["cluster_resources"] = ray.cluster_resources()
        servers["mlflow"].wait_up(240)
        timings["mlflow_up"] = time.time() - t0
        log(f"ray cluster {sorted(alive())} and mlflow server up")

        serve_env = {**ray_env, "RAY_ADDRESS": f"127.0.0.1:{HEAD_PORT}", "ABLATE_STATE_URL": pg.url("ablate"),
                     "MLFLOW_TRACKING_URI": mlflow_uri, "ABLATE_HOME": str(home),
                     "ABLATE_CHECKPOINT_DIR": str(ckpt_root), "ABLATE_STALE_AFTER_S": "4"}
        servers["serve"] = Server("serve", [sys.executable, "-m", "orchestrator.cli", "serve", "--port",
                                            str(SERVE_PORT)], serve_env, logs, f"{serve_url}/health")
        servers["serve"].start(180)
        timings["setup"] = time.time() - t0
        log("ablate serve up: the topology is complete")

        # ---------------------------------------------------------------------------------- submit a grid
        grid_file = workdir / "grid.json"
        grid_file.write_text(json.dumps(GRID))
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "submit", str(grid_file), "--server",
                              serve_url, "--json"], cwd=ROOT, env=serve_env, capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"ablate submit failed ({out.returncode}): {out.stderr[-2000:]}")
        grid_id = report["grid_id"] = json.loads(out.stdout)["id"]
        grid_t0 = time.time()
        log(f"submitted grid {grid_id} over HTTP")
        store = StateStore(pg.url("ablate"))
        keys = [t["key"] for t in store.grid_trials(grid_id)]

        def sample() -> None:  # every trial's newest checkpoint, twice a second
            while not stop_sampling.is_set():
                for key in keys:
                    samples.setdefault(key, []).append((time.time(), newest_checkpoint(ckpt_root / key)))
                stop_sampling.wait(0.5)

        threading.Thread(target=sample, name="sampler", daemon=True).start()

        def counts() -> dict[str, int]:
            return store.counts(grid_id)

        def ckpts() -> dict[str, int]:
            return {k: newest_checkpoint(ckpt_root / k) for k in keys}

        # ------------------------------ (a) SIGKILL a Ray worker node that executes a checkpointed trial
        # In the grid's second wave (the first two trials finished), so no other task waits in Ray's queue:
        # Ray's own retry of the lost task is the next to run on the surviving node, before fault (b).
        def last_wave_past_checkpoint():
            c = counts()
            if c["finished"] > 2:
                raise RuntimeError(f"a second-wave trial finished before the node fault: {c}")
            busy = [n for n in ("worker-a", "worker-b") if executing(nodes[n])]
            past = [k for k, n in ckpts().items() if KILL_AFTER_ITERATION <= n < ITERATIONS]
            return busy[0] if c["finished"] == 2 and len(busy) == 2 and len(past) == 2 else None

        victim_node = wait(last_wave_past_checkpoint, 300, "the second wave executing, each trial past a checkpoint")
        worker_pid = executing(nodes[victim_node])[0]
        first_owner = {k: store.trial(k).owner for k in keys}
        killed_at = time.time()
        killed = nodes[victim_node].kill()
        # Checkpoints come every few iterations: read them once every killed process has exited, or the
        # victim's last one can fall between the reading and its death.
        wait(lambda: exited(killed), 60, f"the processes of {victim_node} to exit")
        before = ckpts()
        fault_a = report["faults"]["ray_node"] = {
            "at_s": killed_at - grid_t0, "node": victim_node, "pids_killed": killed, "worker_pid": worker_pid,
            "checkpoints_at_kill": before, "counts_at_kill": counts()}
        log(f"(a) SIGKILLed {victim_node} ({len(killed)} processes, trial worker {worker_pid}); checkpoints {before}")

        # The trial that stopped advancing while the other went on is the one that ran on the killed node.
        def victim_known():
            if time.time() - killed_at < 3:
                return None
            now = ckpts()
            running = [k for k in keys if KILL_AFTER_ITERATION <= before[k] < ITERATIONS]
            moved = [k for k in running if now[k] > before[k]]
            still = [k for k in running if now[k] == before[k]]
            return (still[0], moved[0]) if len(moved) == 1 and len(still) == 1 else None

        victim, survivor = wait(victim_known, 60, "one trial stalled and the other advancing after the kill")
        fault_a.update(victim=victim, survivor=survivor, victim_checkpoint=before[victim])
        wait(lambda: victim_node not in alive(), 120, f"{victim_node} reported dead")
        fault_a["node_reported_dead_after_s"] = time.time() - killed_at
        fault_a["worker_pid_gone"] = not Path(f"/proc/{worker_pid}").exists()
        log(f"(a) {victim_node} reported dead; victim trial {victim[:12]} stalled at iteration {before[victim]}")
        surviving = nodes["worker-b" if victim_node == "worker-a" else "worker-a"]

        # Ray retries the task on the surviving node once that node's own trial ended: the victim trains
        # again, still in the service's first and only attempt (the scheduler never saw a failure).
        def ray_retry_trains():
            row = store.trial(victim)
            if row.status != "running" or row.owner != first_owner[victim] or row.attempts != 1:
                raise RuntimeError(f"the node loss reached the scheduler: {row.status}, {row.attempts} attempts, "
                                   f"{row.error}")
            return newest_checkpoint(ckpt_root / victim) >= before[victim] + 10 and executing(surviving)

        wait(ray_retry_trains, 240, "Ray's retry of the victim training on the surviving node")
        fault_a["ray_retry_training_after_s"] = time.time() - killed_at
        fault_a["victim_checkpoint_under_ray_retry"] = newest_checkpoint(ckpt_root / victim)
        fault_a["survivor_status"] = store.trial(survivor).status
        log(f"(a) Ray's retry of {victim[:12]} trains on {surviving.name} "
            f"(checkpoint {fault_a['victim_checkpoint_under_ray_retry']})")

        # ----------------------------------------------- (b) SIGKILL `ablate serve` mid-grid and start it again
        owners_before = {t["key"]: store.trial(t["key"]).owner for t in store.grid_trials(grid_id)}
        serve_killed_at = time.time()
        fault_b = report["faults"]["serve"] = {"at_s": serve_killed_at - grid_t0, "counts_at_kill": counts(),
                                               "checkpoints_at_kill": ckpts(),
                                               "executing_at_kill": executing(surviving)}
        fault_b["pids_killed"] = servers["serve"].kill()
        log(f"(b) SIGKILLed ablate serve; counts {fault_b['counts_at_kill']}")
        try:  # Ray ends the dead driver's tasks: nothing keeps training for an owner that is gone
            wait(lambda: not executing(surviving), 30, "the dead driver's task to stop")
            fault_b["orphan_task_stopped_after_s"] = time.time() - serve_killed_at
        except TimeoutError:
            fault_b["orphan_task_stopped_after_s"] = None
        servers["serve"].start(180)
        fault_b["down_s"] = time.time() - serve_killed_at
        log("(b) ablate serve started again")
        restart_ckpts = ckpts()
        old_owners = {o for o in owners_before.values() if o}

        def new_owner_progress():
            for t in store.grid_trials(grid_id):
                row = store.trial(t["key"])
                if (row.status == "running" and row.owner and row.owner not in old_owners
                        and newest_checkpoint(ckpt_root / t["key"]) > restart_ckpts[t["key"]]):
                    return t["key"]
            return None

        resumed_key = wait(new_owner_progress, 180, "a trial training again under the restarted service")
        fault_b["taken_over_after_s"] = time.time() - serve_killed_at
        fault_b["first_resumed"] = resumed_key
        log(f"(b) the restarted service trains again ({resumed_key[:12]})")

        # ------------------------------------------------- (c) the MLflow server down for OUTAGE_S while trials log
        if counts()["finished"] == len(keys):
            raise RuntimeError("the grid ended before the MLflow outage: the grid is too short for this box")
        outage_start = time.time()
        fault_c = report["faults"]["mlflow"] = {"at_s": outage_start - grid_t0, "counts_at_stop": counts(),
                                                "pids_killed": servers["mlflow"].kill()}
        log(f"(c) SIGKILLed the MLflow server; counts {fault_c['counts_at_stop']}")
        time.sleep(OUTAGE_S)
        fault_c["counts_at_restart"] = counts()
        servers["mlflow"].start(180)
        outage_end = time.time()
        fault_c.update(outage_start=outage_start, outage_end=outage_end, down_s=outage_end - outage_start)
        log(f"(c) MLflow server back after {outage_end - outage_start:.1f} s")

        # ------------------------------------------------------------------------------------------- the end
        wait(lambda: counts()["queued"] + counts()["running"] == 0, 420, "the grid to end")
        timings["grid"] = time.time() - grid_t0
        log(f"grid ended: {counts()}")
        client = MlflowClient(tracking_uri=mlflow_uri)

        def synced():
            rows = store.grid_trials(grid_id)
            parent = store.grid(grid_id).mlflow_run_id
            return (all(t["mlflow_synced"] for t in rows) and parent is not None
                    and client.get_run(parent).info.status == "FINISHED")

        try:
            wait(synced, 150, "every child run synced and the parent run ended", poll=1.0)
        except TimeoutError as exc:
            report["sync_timeout"] = str(exc)  # the analysis shows what is missing
        timings["grid_and_sync"] = time.time() - grid_t0
        stop_sampling.set()

        # ------------------------------------------------------------------------------------------ facts
        def close_wait(key: str) -> float | None:
            """Seconds between the last checkpoint and result.json: the live sink's flush at the trial's end."""
            from workers.checkpoint import checkpoints
            folder, found = ckpt_root / key, checkpoints(ckpt_root / key)
            if not found or not (folder / "result.json").exists():
                return None
            return (folder / "result.json").stat().st_mtime - found[0].stat().st_mtime

        trials = {}
        for t in store.grid_trials(grid_id):
            trials[t["key"]] = {
                "variant": t["variant"], "seed": t["seed"], "status": t["status"], "mlflow_run_id": t["mlflow_run_id"],
                "mlflow_synced": t["mlflow_synced"], "result": t["result"], "close_wait_s": close_wait(t["key"]),
                "attempts": [{"owner": a.owner, "started_at": a.started_at, "ended_at": a.ended_at,
                              "outcome": a.outcome, "error": a.error} for a in store.attempts(t["key"])]}
        exp = client.get_experiment_by_name(GRID["name"])
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`ablate.grid` = '{grid_id}'",
                                  max_results=1000) if exp else []
        mlflow_runs = []
        for run in runs:
            metrics = {m: [{"step": p.step, "value": p.value, "timestamp": p.timestamp}
                           for p in client.get_metric_history(run.info.run_id, m)] for m in METRICS}
            mlflow_runs.append({"run_id": run.info.run_id, "status": run.info.status, "tags": dict(run.data.tags),
                                "n_params": len(run.data.params), "latest": dict(run.data.metrics),
                                "metrics": metrics})
        report.update(trials=trials, mlflow_runs=mlflow_runs, final_counts=counts(),
                      http_status=http_get(f"{serve_url}/grids/{grid_id}"),
                      comparison=http_get(f"{serve_url}/grids/{grid_id}/comparison"),
                      nodes={n["NodeName"]: n["Alive"] for n in ray.nodes()},
                      victim_checkpoints_after_kill=[c for t, c in samples.get(victim, []) if t > killed_at])
        # Metric points produced while the server was down (evaluations whose checkpoint appeared in the
        # outage) and how they reached it: the live sink keeps a point's training-time timestamp, the
        # driver's sync stamps the time it logs.
        def checkpoint_at(key: str, when: float) -> int:
            return max((c for t, c in samples.get(key, []) if t <= when), default=0)

        produced = live = synced_later = 0
        for run in mlflow_runs:
            key = run["tags"].get("ablate.trial")
            if key not in trials:
                continue
            low, high = checkpoint_at(key, outage_start), checkpoint_at(key, outage_end)
            for metric, points in run["metrics"].items():
                steps = [h["step"] for h in (trials[key]["result"] or {}).get("history", [])
                         if low < h["step"] <= high and h.get(metric) is not None]
                produced += len(steps)
                for p in points:
                    if p["step"] in steps:
                        if p["timestamp"] <= outage_end * 1000:
                            live += 1
                        else:
                            synced_later += 1
        fault_c.update(points_produced_during_outage=produced, delivered_by_live_sink=live,
                       recovered_by_driver_sync=synced_later)
        fault_c["trials_ended_during_outage"] = sum(
            1 for t in trials.values() for a in t["attempts"]
            if a["outcome"] == "finished" and outage_start <= a["ended_at"] <= outage_end)
        report["analysis"] = analyse(report)
        ray.shutdown()
    except BaseException:
        report["scenario_error"] = traceback.format_exc()
        log(report["scenario_error"])
    finally:
        stop_sampling.set()
        for name in ("serve", "mlflow"):
            if name in servers:
                servers[name].kill()
        for node in nodes.values():
            node.kill()
        try:
            pg.stop()
        except Exception as exc:  # the namespace's end takes it down in any case
            log(f"pg_ctl stop: {exc}")
        for src in [pg.folder / "postgres.log", *ray_tmp.glob("*/session_latest/logs/raylet.out")]:
            if src.exists():
                shutil.copy(src, logs / f"{src.parent.parent.parent.name}-{src.name}"
                            if src.name == "raylet.out" else logs / src.name)
        shutil.rmtree(pg.folder, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        timings["total"] = time.time() - t0
        (workdir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    out = main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
    sys.exit(1 if out.get("scenario_error") else 0)
