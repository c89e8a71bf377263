"""A real multi-node Ray cluster: a worker node killed mid-trial, and the trial completes from its checkpoint
on the other node.

The cluster is three `ray start` nodes (a head with no CPUs, two one-CPU workers) run by
tests/cluster_scenario.py inside its own network namespace, so Ray stays on loopback (shared/NOTES.md),
and its own PID namespace, so no Ray process can outlive the test. The scenario SIGKILLs every process of
the node that runs a checkpointed trial (raylet, agents, the Ray worker) and reports what happened; the assertions read
that report and the state store.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.state import StateStore
from tests.helpers import ROOT

SCENARIO = ROOT / "tests" / "cluster_scenario.py"
# A private network namespace, plus a PID namespace whose init takes every Ray process down with it.
FULL = ["-n", "-p", "-f", "--mount-proc", "--kill-child"]


def namespace_flags() -> list[str]:
    """The strongest `unshare` isolation this machine permits; skips when not even a network namespace is."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) to give Ray its own loopback-only network")
    why = ""
    for flags in (FULL, ["-n"]):
        probe = subprocess.run(["unshare", *flags, "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
        if probe.returncode == 0:
            return flags
        why = why or probe.stderr.strip()
    pytest.skip(f"`unshare -n` is not permitted here ({why}): a multi-node Ray needs its own network namespace")


def ray_processes_using(folder: str) -> list[str]:
    """Command lines of live processes that mention `folder` (Ray passes its temp folder to each process)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if folder in cmd:
                found.append(f"{proc.name}: {cmd[:200]}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_worker_node_killed_mid_trial_resumes_from_checkpoint_on_another_node(tmp_path):
    flags = namespace_flags()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ABLATE_STATE_URL", "MLFLOW_TRACKING_URI")}
    log = tmp_path / "scenario.log"
    script = 'ip link set lo up && "$0" "$1" "$2"; rc=$?; exit $rc'  # bash stays as the namespace's init
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", *flags, "bash", "-c", script, sys.executable, str(SCENARIO),
                                 str(tmp_path)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=480)
        except subprocess.TimeoutExpired:
            proc.kill()  # unshare's death kills the namespace's init, and with it every process inside
            proc.wait()
            pytest.fail(f"the cluster scenario ran over 480 s:\n{log.read_text(errors='replace')[-6000:]}")
    output = log.read_text(errors="replace")[-6000:]
    report_file = tmp_path / "report.json"
    assert report_file.exists(), f"the scenario wrote no report (exit {rc}):\n{output}"
    report = json.loads(report_file.read_text())
    assert rc == 0 and "scenario_error" not in report, output
    assert report["grid_error"] is None, report["grid_error"]
    print(f"\ncluster scenario timings (s): {json.dumps({k: round(v, 1) for k, v in report['timings'].items()})}")

    # The node really died, and the cluster says so; the other nodes lived on.
    killed = report["killed_node"]
    assert killed in ("worker-a", "worker-b")
    assert report["victim_pid"] in report["killed_pids"], "the Ray worker running the trial was killed with its node"
    assert report["nodes"] == {"head": True, "worker-a": killed != "worker-a", "worker-b": killed != "worker-b"}

    # Both trials ended finished, each trained to the end exactly once, in one orchestrator attempt:
    # Ray re-ran the task itself (its max_retries), the scheduler never saw a failure.
    summary = report["summary"]
    assert summary["counts"]["finished"] == 2 and summary["executed"] == 2, summary
    assert summary["mlflow_unsynced"] == 0
    store = StateStore(f"sqlite:///{tmp_path / 'home' / 'state.db'}")
    trials = {t["key"]: t for t in store.grid_trials(report["grid_id"])}
    assert len(trials) == 2 and all(t["status"] == "finished" for t in trials.values())
    for key in trials:
        attempts = store.attempts(key)
        assert [a.outcome for a in attempts] == ["finished"], f"{key}: {[(a.outcome, a.error) for a in attempts]}"

    # The victim ran first on the node that was killed, then again on the surviving worker node, where it
    # resumed from its checkpoint (not from scratch) and trained to the last iteration.
    victim = trials[report["victim_key"]]
    runs = [(r["node"], r["pid"]) for r in report["traces"] if r["key"] == victim["key"]]
    assert len(runs) == 2 and runs[0][0] == killed, runs
    assert runs[1][0] in ("worker-a", "worker-b") and runs[1][0] != killed, runs
    result = victim["result"]
    assert report["checkpoint_before_kill"] > 0
    assert report["checkpoint_before_kill"] <= result["resumed_from"] < report["iterations"], result["resumed_from"]
    assert result["iterations"] == report["iterations"] and result["history"][-1]["step"] == report["iterations"]

    # The trial on the surviving node was never interrupted.
    (other,) = [t for k, t in trials.items() if k != victim["key"]]
    assert other["result"]["resumed_from"] is None
    assert [r["node"] for r in report["traces"] if r["key"] == other["key"]] == [runs[1][0]]

    # No Ray process of this cluster is left anywhere.
    assert ray_processes_using(report["ray_tmp"]) == []
