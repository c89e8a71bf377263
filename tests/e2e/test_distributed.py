"""Distributed end to end (issue 8): the docker-compose topology, natively, with three faults mid-grid.

PostgreSQL 15 (Ablate's state and MLflow's backend), a real `mlflow server` with served artifacts, a Ray
head and two worker nodes (`ray start`), and `ablate serve`, all started by tests/e2e/scenario.py inside
their own network namespace (traffic on loopback only) and PID namespace (nothing outlives the test).
A 2 variants x 2 seeds grid is submitted over HTTP; while it runs a Ray worker node executing a trial is
SIGKILLed, then `ablate serve` is SIGKILLed and started again, then the MLflow server is down for 30 s.
Afterwards: no trial lost or duplicated, the MLflow run tree as the contract says, and every metric point
of every trial's own record (its result history) in its MLflow child run.

The scenario writes WORKDIR/report.json (every fact); this test asserts on it and writes a short
summary.json next to it, printed under `pytest -s`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.e2e.scenario import ITERATIONS, OUTAGE_S
from tests.helpers import ROOT
from tests.postgres import postgres_missing
from tests.test_cluster import namespace_flags, ray_processes_using

SCENARIO = ROOT / "tests" / "e2e" / "scenario.py"
SCENARIO_LIMIT_S = 600


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(SCENARIO_LIMIT_S + 120)
def test_grid_survives_node_loss_service_restart_and_mlflow_outage(tmp_path):
    if reason := postgres_missing():
        pytest.skip(reason)
    flags = namespace_flags()
    scratch = Path(tempfile.mkdtemp(prefix="e2e-", dir="/tmp"))  # short paths for sockets; `postgres` may enter
    os.chmod(scratch, 0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "ABLATE_STATE_URL", "MLFLOW_TRACKING_URI", "ABLATE_CHECKPOINT_DIR")}
    script = 'ip link set lo up && "$0" "$@"; rc=$?; exit $rc'  # bash stays as the namespace's init
    log = tmp_path / "scenario.log"
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(["unshare", *flags, "bash", "-c", script, sys.executable, str(SCENARIO),
                                     str(tmp_path), str(scratch)], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=SCENARIO_LIMIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()  # unshare's death kills the namespace's init, and with it every process inside
                proc.wait()
                pytest.fail(f"the scenario ran over {SCENARIO_LIMIT_S} s:\n{log.read_text(errors='replace')[-6000:]}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    output = log.read_text(errors="replace")[-6000:]
    report_file = tmp_path / "report.json"
    assert report_file.exists(), f"the scenario wrote no report (exit {rc}):\n{output}"
    report = json.loads(report_file.read_text())
    assert rc == 0 and "scenario_error" not in report, report.get("scenario_error") or output
    analysis, faults, timings = report["analysis"], report["faults"], report["timings"]

    summary = {
        "grid": report["grid_id"], "topology": "postgres15 + mlflow server + ray head(0 CPU) + 2 ray workers(1 CPU) "
                                               "+ ablate serve, one netns/pidns",
        "trials": analysis["trials"], "iterations_per_trial": ITERATIONS,
        "faults": {
            "ray_worker_node_sigkill": {
                "at_s": round(faults["ray_node"]["at_s"], 1), "node": faults["ray_node"]["node"],
                "processes_killed": len(faults["ray_node"]["pids_killed"]),
                "trial": faults["ray_node"]["victim"][:12],
                "checkpoint_at_kill": faults["ray_node"]["victim_checkpoint"],
                "node_reported_dead_after_s": round(faults["ray_node"]["node_reported_dead_after_s"], 1),
                "ray_retry_training_after_s": round(faults["ray_node"]["ray_retry_training_after_s"], 1),
                "final_resumed_from": report["trials"][faults["ray_node"]["victim"]]["result"]["resumed_from"]},
            "ablate_serve_sigkill_restart": {
                "at_s": round(faults["serve"]["at_s"], 1), "counts_at_kill": faults["serve"]["counts_at_kill"],
                "down_s": round(faults["serve"]["down_s"], 1),
                "dead_driver_task_stopped_after_s": faults["serve"]["orphan_task_stopped_after_s"] and
                round(faults["serve"]["orphan_task_stopped_after_s"], 1),
                "training_again_after_s": round(faults["serve"]["taken_over_after_s"], 1)},
            "mlflow_server_outage": {
                "at_s": round(faults["mlflow"]["at_s"], 1), "stopped_s": OUTAGE_S,
                "down_until_healthy_s": round(faults["mlflow"]["down_s"], 1),
                "counts_at_stop": faults["mlflow"]["counts_at_stop"],
                **{k: faults["mlflow"][k] for k in ("points_produced_during_outage", "delivered_by_live_sink",
                                                    "recovered_by_driver_sync")},
                "trials_ended_during_outage": faults["mlflow"]["trials_ended_during_outage"]}},
        **{k: analysis[k] for k in ("trials_lost", "trials_duplicated", "mlflow_child_runs", "metric_points_expected",
                                    "metrics_lost", "metric_points_mismatched", "metric_points_duplicated")},
        "trial_end_waits_on_live_sink_s": {k[:12]: t["close_wait_s"] and round(t["close_wait_s"], 1)
                                            for k, t in report["trials"].items()},
        "wall_s": {k: round(timings[k], 1) for k in ("setup", "grid", "grid_and_sync", "total") if k in timings},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ne2e summary ({tmp_path / 'summary.json'}):\n{json.dumps(summary, indent=1)}")

    # Every trial finished exactly once, in one child run each; nothing is left of the cluster.
    assert report.get("sync_timeout") is None, (report["sync_timeout"], report["trials"])
    assert analysis["trials"] == 4 and analysis["trials_lost"] == 0, report["final_counts"]
    assert analysis["trials_duplicated"] == 0, {k: t["attempts"] for k, t in report["trials"].items()}
    for key, trial in report["trials"].items():
        outcomes = [a["outcome"] for a in trial["attempts"]]
        assert outcomes.count("finished") == 1 and "error" not in outcomes, (key, trial["attempts"])
        assert trial["result"]["iterations"] == ITERATIONS and trial["result"]["history"][-1]["step"] == ITERATIONS

    # (a) The node died with the Ray worker of the trial; the trial resumed from its checkpoint, never from
    # scratch, on the only worker node left, and the orchestrator saw no failure (Ray retried the task).
    fault_a = faults["ray_node"]
    assert fault_a["worker_pid"] in fault_a["pids_killed"] and fault_a["worker_pid_gone"]
    assert report["nodes"][fault_a["node"]] is False and sum(report["nodes"].values()) == 2, report["nodes"]
    victim = report["trials"][fault_a["victim"]]
    assert fault_a["victim_checkpoint"] >= 30 and fault_a["survivor_status"] == "finished"
    assert fault_a["victim_checkpoint_under_ray_retry"] >= fault_a["victim_checkpoint"] + 10
    assert min(report["victim_checkpoints_after_kill"]) >= fault_a["victim_checkpoint"]
    assert victim["result"]["resumed_from"] >= fault_a["victim_checkpoint"]
    # Retrained from scratch, it would have logged its evaluation at 25 again (live): no such duplicate.
    early = [s for s in analysis["duplicate_steps"].get(fault_a["victim"], []) if s <= fault_a["victim_checkpoint"]]
    assert early == [], f"the victim re-logged steps {early}: it was trained again from scratch"

    # (b) The service was killed mid-grid (a trial done, others not) and its successor finished the rest.
    assert faults["serve"]["counts_at_kill"]["finished"] >= 1
    assert faults["serve"]["counts_at_kill"]["running"] + faults["serve"]["counts_at_kill"]["queued"] >= 1
    owners = {a["owner"] for t in report["trials"].values() for a in t["attempts"]}
    assert len(owners) >= 2, "the restarted service took trials over"

    # (c) Trials logged while MLflow was down, and those points still reached it.
    assert faults["mlflow"]["down_s"] >= 30
    assert faults["mlflow"]["points_produced_during_outage"] > 0
    assert (faults["mlflow"]["delivered_by_live_sink"] + faults["mlflow"]["recovered_by_driver_sync"]
            >= faults["mlflow"]["points_produced_during_outage"])

    # The MLflow run tree of the contract, every metric point of every record in it.
    assert analysis["mlflow_parent_runs"] == 1 and analysis["mlflow_child_runs"] == 4
    assert analysis["trials_without_child_run"] == 0 and analysis["stray_child_runs"] == 0
    assert analysis["run_tree_problems"] == [], analysis["run_tree_problems"]
    assert analysis["metric_points_expected"] == 4 * 3 * (ITERATIONS // 25)
    assert analysis["metrics_lost"] == 0 and analysis["metric_points_mismatched"] == 0, analysis

    # The comparison over HTTP: both cells with both seeds.
    rows = report["comparison"]["rows"]
    assert [r["variant"] for r in rows] == ["original", "full_preact"] and all(r["n"] == 2 for r in rows), rows
    assert report["http_status"]["finished"] == 4

    assert ray_processes_using(str(tmp_path)) == [] and ray_processes_using(str(scratch)) == []
