"""A real three-node Ray cluster on one machine, a worker node killed mid-trial: the scenario of test_cluster.

Run by tests/test_cluster.py inside its own network and PID namespaces (`unshare -n -p -f --mount-proc`):
the network namespace keeps Ray on loopback (shared/NOTES.md), the PID namespace guarantees that every
Ray process dies with the scenario, whatever happens. Usage: `cluster_scenario.py WORKDIR`.

Steps: start a head with no CPUs and two one-CPU worker nodes, each `ray start` in its own session (so
one node is one session: raylet, agents, log monitor, and the Ray workers the raylet forks); run a
two-trial grid through the real GridRunner in a thread; once a trial has written a checkpoint, SIGKILL
every process of the node that runs it; let the grid finish. The facts go to WORKDIR/report.json, the
assertions are the test's.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RAY = str(Path(sys.executable).parent / "ray")
HEAD_PORT = 6379
ITERATIONS = 200
KILL_AFTER_ITERATION = 10  # the victim has a whole checkpoint at least this far before its node dies
GRID = {"name": "cluster", "dataset": "synthetic", "subset": 512,
        "recipe": {"base": "smoke", "iterations": ITERATIONS, "checkpoint_every": 5, "eval_every": ITERATIONS,
                   "milestones": [ITERATIONS * 3 // 4]},
        "depths": [8], "block": "basic", "width": 4, "variants": ["original"], "seeds": 2, "max_retries": 3}


def traced_trial(task: dict) -> dict:
    """The real `execute_trial`, after noting which node and process run this attempt of the trial.

    Defined in __main__, so Ray ships it by value; only the trace file is added to what runs.
    """
    import ray

    from orchestrator.scheduler import execute_trial
    folder = Path(task["checkpoint_dir"])
    trace = folder.parent.parent / "trace"
    trace.mkdir(parents=True, exist_ok=True)
    record = {"key": folder.name, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
              "started": time.time()}
    (trace / f"{folder.name}.{time.time_ns()}.json").write_text(json.dumps(record))
    return execute_trial(task)


def log(msg: str, t0: float = time.time()) -> None:
    print(f"[scenario {time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class Node:
    """One `ray start` in its own session: every process of that session is the node.

    Not one process group: the raylet puts each Ray worker it forks in a group of its own, so killing the
    node's group would leave the worker running the trial to die later of the raylet's absence.
    """

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path):
        self.name = name
        out = open(logs / f"ray-start-{name}.log", "wb")
        self.proc = subprocess.Popen([RAY, "start", "--node-name", name, "--disable-usage-stats",
                                      "--object-store-memory", str(80 * 2**20), *args],
                                     env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.sid = self.proc.pid

    def wait_started(self, timeout: float) -> None:
        rc = self.proc.wait(timeout)
        if rc != 0:
            raise RuntimeError(f"ray start for {self.name} exited with {rc}")

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once (twice over, in case one forked meanwhile)."""
        killed: list[int] = []
        for _ in range(2):
            for pid in session_pids(self.sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        return sorted(set(killed))


def exited(pids: list[int]) -> bool:
    """Every one of `pids` has exited (a zombie has: it runs no code and writes no file any more)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return False
    return True


def newest_checkpoint(folder: Path) -> int:
    its = [int(p.name[5:14]) for p in folder.glob("ckpt-*.pt")] if folder.is_dir() else []
    return max(its, default=0)


def wait(predicate, timeout: float, what: str, poll: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def main(workdir: Path) -> dict:
    t0 = time.time()
    home = workdir / "home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="ablate-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "ABLATE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "RAY_TMPDIR": str(ray_tmp),
           # A killed raylet refuses connections at once: 5 failed checks 1 s apart (~5 s) rather than
           # Ray's ~15 s; a live but CPU-starved one still has 5 s per check before it counts as failed.
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000",
           "RAY_health_check_failure_threshold": "5"}
    for var in ("RAY_ADDRESS", "ABLATE_STATE_URL", "ABLATE_CHECKPOINT_DIR"):
        env.pop(var, None)
    report: dict = {"iterations": ITERATIONS, "ray_tmp": str(ray_tmp), "timings": {}}
    nodes: dict[str, Node] = {}
    try:
        # Every node its own temp folder (sockets, logs): two `ray start`s racing on one pick the same names.
        nodes["head"] = Node("head", ["--head", "--port", str(HEAD_PORT), "--num-cpus", "0",
                                      "--include-dashboard", "false", "--temp-dir", str(ray_tmp / "head")],
                             env, workdir)
        nodes["head"].wait_started(180)
        report["timings"]["head_up"] = time.time() - t0
        log("head started")
        for name, base in (("worker-a", 20000), ("worker-b", 21000)):
            # Started together, so every port is fixed: Ray's own free-port picks race between nodes.
            ports = ["--node-manager-port", base + 1, "--object-manager-port", base + 2,
                     "--metrics-export-port", base + 3, "--dashboard-agent-listen-port", base + 4,
                     "--dashboard-agent-grpc-port", base + 5, "--runtime-env-agent-port", base + 6,
                     "--min-worker-port", base + 100, "--max-worker-port", base + 199]
            nodes[name] = Node(name, ["--address", f"127.0.0.1:{HEAD_PORT}", "--num-cpus", "1",
                                      "--temp-dir", str(ray_tmp / name), *map(str, ports)], env, workdir)
        for name in ("worker-a", "worker-b"):
            nodes[name].wait_started(180)
        log("worker nodes started")

        os.environ.clear()
        os.environ.update(env, RAY_ADDRESS=f"127.0.0.1:{HEAD_PORT}")
        import ray

        from orchestrator.grids import load_grid
        from orchestrator.cluster import ensure_ray
        from orchestrator.scheduler import GridRunner
        from orchestrator.state import StateStore
        ensure_ray()  # the scheduler's own connection path: RAY_ADDRESS is set

        def alive_nodes():
            return {n["NodeName"]: n for n in ray.nodes() if n["Alive"]}

        wait(lambda: len(alive_nodes()) == 3, 120, "three alive nodes")
        by_id = {n["NodeID"]: n["NodeName"] for n in ray.nodes()}
        report["cluster_resources"] = ray.cluster_resources()
        report["timings"]["cluster_up"] = time.time() - t0
        log(f"cluster up: {sorted(alive_nodes())}")

        spec = load_grid(GRID)
        grid_id = report["grid_id"] = spec.grid_id()
        outcome: dict = {}

        def run_grid():
            try:
                outcome["summary"] = GridRunner(trial_fn=traced_trial, progress=False).run(spec)
            except BaseException:
                outcome["error"] = traceback.format_exc()

        runner = threading.Thread(target=run_grid, name="grid", daemon=True)
        grid_t0 = time.time()
        runner.start()

        trace_dir = home / "trace"
        ckpt_root = home / "checkpoints"

        def traces():
            out = []
            for p in sorted(trace_dir.glob("*.json")) if trace_dir.is_dir() else []:
                try:
                    rec = json.loads(p.read_text())
                except ValueError:
                    continue  # being written
                out.append({**rec, "node": by_id.get(rec["node_id"], rec["node_id"])})
            return sorted(out, key=lambda r: r["started"])

        def victim():
            if "error" in outcome or "summary" in outcome:
                raise RuntimeError(f"the grid ended before any node was killed: {outcome}")
            running = {r["key"]: r for r in traces()}
            for key, rec in running.items():
                if newest_checkpoint(ckpt_root / key) >= KILL_AFTER_ITERATION and len(running) == 2:
                    return rec
            return None

        rec = wait(victim, 240, "a trial with a checkpoint on a worker node")
        before_kill = newest_checkpoint(ckpt_root / rec["key"])
        keys = [t["key"] for t in StateStore().grid_trials(grid_id)]
        report["checkpoints_at_kill"] = {k: newest_checkpoint(ckpt_root / k) for k in keys}
        report["killed_pids"] = nodes[rec["node"]].kill()
        killed_at = time.time()
        report.update(victim_key=rec["key"], victim_pid=rec["pid"], killed_node=rec["node"],
                      killed_node_id=rec["node_id"], checkpoint_before_kill=before_kill)
        report["timings"]["kill"] = killed_at - t0
        log(f"killed {rec['node']} (processes {report['killed_pids']}) while trial {rec['key'][:12]} "
            f"(process {rec['pid']}) was past its checkpoint at iteration {before_kill}")

        wait(lambda: rec["node"] not in alive_nodes(), 120, f"{rec['node']} reported dead")
        report["timings"]["node_reported_dead_after_kill"] = time.time() - killed_at
        log("ray.nodes() reports the node dead")

        runner.join(timeout=300)
        if runner.is_alive():
            raise TimeoutError("the grid did not finish within 300 s of the kill")
        report["timings"]["grid"] = time.time() - grid_t0
        report["grid_error"] = outcome.get("error")
        report["summary"] = outcome.get("summary")
        report["traces"] = traces()
        report["nodes"] = {n["NodeName"]: n["Alive"] for n in ray.nodes()}
        log(f"grid ended: {outcome.get('summary', {}).get('counts')}")
        ray.shutdown()
    except BaseException:
        report["scenario_error"] = traceback.format_exc()
        log(report["scenario_error"])
    finally:
        for node in nodes.values():
            node.kill()
        if "scenario_error" in report:  # keep Ray's own logs for the diagnosis
            for logs in ray_tmp.glob("*/session_*/logs"):
                shutil.copytree(logs, workdir / "ray-logs" / logs.parent.parent.name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock", "events"))
        shutil.rmtree(ray_tmp, ignore_errors=True)
        report["timings"]["total"] = time.time() - t0
        (workdir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    out = main(Path(sys.argv[1]).resolve())
    sys.exit(1 if out.get("scenario_error") else 0)
