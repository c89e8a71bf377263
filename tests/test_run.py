"""Grids on a real local Ray with a real MLflow server: reuse, growth, the run tree, crashes, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import scheduler
from orchestrator.grids import load_grid
from orchestrator.scheduler import GridInterrupted, GridRunner
from orchestrator.state import STATES, StateStore
from orchestrator.tracking import Tracker, default_tracking_uri
from tests.helpers import ROOT, ablate, wait_for

SMOKE = {"name": "smoke-t", "dataset": "synthetic", "subset": 512, "recipe": "smoke", "depths": [8],
         "block": "basic", "width": 4, "variants": ["original", "full_preact"], "seeds": 2}


def children(client, parent_run_id):
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def test_grid_runs_once_reuses_and_grows(ablate_home, local_ray, mlflow_server):
    runner = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), progress=False)
    first = runner.run(load_grid(SMOKE))
    assert (first["trials"], first["executed"], first["reused"]) == (4, 4, 0)
    assert first["counts"]["finished"] == 4 and first["mlflow_unsynced"] == 0

    again = runner.run(load_grid(SMOKE))
    assert (again["grid"], again["executed"], again["reused"]) == (first["grid"], 0, 4)

    grown = runner.run(load_grid({**SMOKE, "seeds": 3}))
    assert (grown["trials"], grown["executed"], grown["reused"]) == (6, 2, 4)

    # The MLflow run tree, read back from the server.
    client = MlflowClient(mlflow_server.uri)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["ablate.grid"] == first["grid"] and parent.info.status == "FINISHED"
    kids = children(client, first["mlflow_run_id"])
    assert len(kids) == 4
    store = StateStore()
    by_key = {t["key"]: t for t in store.grid_trials(first["grid"])}
    for run in kids:
        tags = run.data.tags
        trial = by_key[tags["ablate.trial"]]
        assert (tags["ablate.variant"], tags["ablate.depth"], tags["ablate.seed"]) == (
            trial["variant"], "8", str(trial["seed"]))
        assert tags["ablate.status"] == "finished" and tags["ablate.dataset"] == "synthetic"
        assert tags["ablate.unit"] in ("original", "full_preact") and run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "test_error")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [20, 40]
        assert run.data.metrics["test_error"] == pytest.approx(trial["test_error"])
        assert run.data.params["recipe.iterations"] == "40" and run.data.params["seed"] == str(trial["seed"])
    # The grown grid logs all six trials, the four reused ones from their stored records.
    assert len(children(client, grown["mlflow_run_id"])) == 6


def test_fused_seed_groups_run_as_one_task_with_per_seed_records_and_runs(ablate_home, local_ray, mlflow_server,
                                                                        monkeypatch):
    """`fuse_seeds: 2`: each cell's two seeds train as one Ray task, yet state rows, results, checkpoints and
    MLflow child runs stay per seed, and the numbers match the same grid trained seed by seed."""
    runner = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), progress=False)
    fused = runner.run(load_grid({**SMOKE, "name": "fused-t", "seeds": 3, "fuse_seeds": 2}))
    assert (fused["trials"], fused["executed"], fused["counts"]["finished"]) == (6, 6, 6)
    # A fuse_seeds change is how, not what: the grid is the same and nothing trains again.
    assert runner.run(load_grid({**SMOKE, "name": "fused-t", "seeds": 3}))["executed"] == 0
    trials = StateStore().grid_trials(fused["grid"])
    groups = sorted(t["result"].get("fused", 1) for t in trials)
    assert groups == [1, 1, 2, 2, 2, 2]  # per variant: seeds 0+1 fused, seed 2 alone (a group of one)
    for t in trials:
        assert (ablate_home / "checkpoints" / t["key"] / "result.json").exists()
    client = MlflowClient(mlflow_server.uri)
    kids = children(client, fused["mlflow_run_id"])
    assert sorted(r.data.tags["ablate.seed"] for r in kids) == ["0", "0", "1", "1", "2", "2"]
    for run in kids:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_error"))
        assert steps == [20, 40] and run.info.status == "FINISHED"

    # The same trials one by one, in a fresh store: per seed the same history within float tolerance.
    monkeypatch.setenv("ABLATE_HOME", str(ablate_home / "solo"))
    solo = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), progress=False)
    out = solo.run(load_grid({**SMOKE, "name": "fused-t", "seeds": 3}))
    alone = {t["key"]: t["result"] for t in StateStore().grid_trials(out["grid"])}
    for t in trials:
        # tests/test_fused.py pins the tolerance tightly; here: the same numbers up to float reordering.
        for f, a in zip(t["result"]["history"], alone[t["key"]]["history"], strict=True):
            assert (f["step"], f["lr"]) == (a["step"], a["lr"])
            assert f["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
            assert ("test_error" in f) == ("test_error" in a)  # test metrics at evaluations only
            assert abs(f.get("test_error", 0) - a.get("test_error", 0)) <= 1.0


def test_a_child_run_left_unsaved_by_a_killed_driver_is_adopted_not_duplicated(ablate_home, local_ray,
                                                                               mlflow_server):
    """A driver killed between MLflow's create_run and saving the id leaves a run the state does not know."""
    spec = load_grid({**SMOKE, "name": "orphan-t", "seeds": 1})
    runner = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), progress=False)
    grid_id = runner.submit(spec)
    parent = runner._parent_run(spec, grid_id)
    trial = StateStore().grid_trials(grid_id)[0]
    stray = runner.tracker.start_trial(spec.name, grid_id, parent, trial, json.loads(trial["config"]))

    out = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), progress=False).run(spec)
    assert out["counts"]["finished"] == 2 and out["mlflow_unsynced"] == 0
    kids = children(MlflowClient(mlflow_server.uri), parent)
    assert sorted(r.data.tags["ablate.variant"] for r in kids) == ["full_preact", "original"]
    adopted = [r for r in kids if r.data.tags["ablate.trial"] == trial["key"]]
    assert [r.info.run_id for r in adopted] == [stray] and adopted[0].info.status == "FINISHED"


def test_failing_trials_retry_then_error(ablate_home, local_ray, tmp_path):
    spec = load_grid({**SMOKE, "name": "broken", "dataset": "cifar10", "data_dir": str(tmp_path / "nothing"),
                      "seeds": 1, "variants": ["original"], "max_retries": 1})
    out = GridRunner(progress=False).run(spec, sync_timeout_s=0)
    assert out["counts"]["error"] == 1 and out["executed"] == 0
    trial = StateStore().grid_trials(out["grid"])[0]
    assert trial["attempts"] == 2 and "cifar-10-batches-py" in trial["error"]


def never_answering_trial(task: dict) -> dict:
    """A trial that ignores its time limit (a hung worker): only the scheduler's backstop ends it."""
    import time
    time.sleep(600)
    return {}


def test_a_task_that_never_answers_is_failed_by_the_backstop(ablate_home, local_ray, monkeypatch):
    monkeypatch.setattr(scheduler, "QUEUE_SLACK_S", 1.0)  # backstop: timeout_s × attempts + 1 s
    spec = load_grid({**SMOKE, "name": "hung", "seeds": 1, "variants": ["original"], "timeout_s": 1,
                      "max_retries": 1})
    out = GridRunner(trial_fn=never_answering_trial, progress=False).run(spec, sync_timeout_s=0)
    assert out["counts"]["error"] == 1 and out["executed"] == 0
    trial = StateStore().grid_trials(out["grid"])[0]
    assert trial["attempts"] == 2 and trial["error"] == "no answer after 3 s"


def start_grid(tmp_path, grid, sigint_ignored=False, **env_extra):
    """`ablate run` on a grid file in a subprocess; returns it, its environment, its store and grid id."""
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(grid))
    env = {**os.environ, "ABLATE_HOME": str(tmp_path / "home"), **env_extra}
    env.pop("RAY_ADDRESS", None)
    proc = run_cli(grid_file, env, sigint_ignored=sigint_ignored)
    state_db = tmp_path / "home" / "state.db"
    assert wait_for(state_db.exists, 60)
    return proc, grid_file, env, StateStore(f"sqlite:///{state_db}"), load_grid(grid).grid_id()


def run_cli(grid_file, env, sigint_ignored=False, **kw):
    """`sigint_ignored`: start it as a shell starts a script's background job (SIGINT inherited ignored)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if sigint_ignored else None
    try:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(grid_file), "--json"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kw)
    finally:
        if sigint_ignored:
            signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_orchestrator_killed_mid_grid_then_rerun_loses_and_repeats_nothing(tmp_path, mlflow_server):
    grid = {**SMOKE, "name": "crash", "seeds": 3, "recipe": {"base": "smoke", "iterations": 160,
                                                             "checkpoint_every": 10, "eval_every": 80,
                                                             "milestones": [120]}}
    proc, grid_file, env, store, grid_id = start_grid(tmp_path, grid, MLFLOW_TRACKING_URI=mlflow_server.uri,
                                                      ABLATE_STALE_AFTER_S="4")
    assert wait_for(lambda: store.grid(grid_id) is not None and store.counts(grid_id)["finished"] >= 1
                    and store.counts(grid_id)["running"] >= 1, 240), proc.stderr.read() if proc.poll() else ""
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    before = store.counts(grid_id)
    assert before["finished"] < 6

    rerun = run_cli(grid_file, env)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    result = json.loads(out)
    assert result["counts"]["finished"] == 6 and result["executed"] + result["reused"] == 6
    assert result["reused"] == before["finished"]
    for trial in store.grid_trials(grid_id):
        finished = [a for a in store.attempts(trial["key"]) if a.outcome == "finished"]
        assert len(finished) == 1, f"trial {trial['key']} trained to the end {len(finished)} times"
    resumed = [t for t in store.grid_trials(grid_id) if t["result"]["resumed_from"]]
    assert resumed, "a trial interrupted mid-way resumes from its checkpoint"


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_grid(tmp_path):
    """SIGINT mid-trial: exit 130, nothing left running, the interrupted trial queued beside its checkpoint.

    The driver starts with SIGINT ignored, as a shell starts a script's background job (and as some test
    runners start this suite): `ablate run` honours it all the same."""
    grid = {**SMOKE, "name": "sigint", "seeds": 2, "recipe": {"base": "smoke", "iterations": 4000,
                                                              "checkpoint_every": 10, "eval_every": 2000,
                                                              "milestones": [3000]}}
    proc, _, _, store, grid_id = start_grid(tmp_path, grid, sigint_ignored=True, MLFLOW_TRACKING_URI="")
    try:
        # Mid-trial on any machine: a first checkpoint is written, hundreds more are to come.
        written = lambda: list((tmp_path / "home" / "checkpoints").glob("*/ckpt-*.pt"))  # noqa: E731
        assert wait_for(written, 240, every=0.05), proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    counts = store.counts(grid_id)
    assert counts["running"] == 0 and counts["queued"] + counts["finished"] == 4 and counts["queued"] >= 1
    for ckpt in written():
        assert store.trial(ckpt.parent.name).status == "queued"  # resumable from that checkpoint
    status = ablate("status", grid_id, "--json", env={"ABLATE_HOME": str(tmp_path / "home")})
    assert status.code == 0 and status.json["queued"] == counts["queued"]


def test_ctrl_c_between_a_claim_and_its_submission_hands_the_trial_back(ablate_home, local_ray):
    """The interrupt lands right after a claim committed, before its task exists: nothing stays running."""
    class InterruptedAfterClaim(StateStore):
        def claim(self, key, owner, **kw):
            super().claim(key, owner, **kw)
            raise KeyboardInterrupt

    runner = GridRunner(store=InterruptedAfterClaim(), progress=False)
    spec = load_grid({**SMOKE, "name": "claim-interrupted", "seeds": 1})
    with pytest.raises(GridInterrupted):
        runner.run(spec, sync_timeout_s=0)
    assert StateStore().counts(spec.grid_id()) == {**dict.fromkeys(STATES, 0), "queued": 2}
    assert all(t["attempts"] == 0 for t in StateStore().grid_trials(spec.grid_id()))


def test_the_grid_driver_never_imports_torch(ablate_home, local_ray):
    """Trials import torch in their workers; the driver (claims, records, MLflow sync with checkpoint
    artifacts) must not: the import costs seconds and stalls submissions while it runs."""
    code = ("import json, sys; from orchestrator.grids import load_grid; from orchestrator.scheduler import GridRunner; "
            "out = GridRunner(progress=False).run(load_grid(json.loads(sys.argv[1]))); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'executed': out['executed'], "
            "'unsynced': out['mlflow_unsynced']}))")
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    spec = {**SMOKE, "name": "no-torch", "variants": ["original"], "seeds": 1}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"torch": False, "executed": 1, "unsynced": 0}
    client = MlflowClient(default_tracking_uri())  # the embedded store under $ABLATE_HOME
    run = client.search_runs([client.get_experiment_by_name("no-torch").experiment_id], "tags.ablate.trial != ''")[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"checkpoint", "result.json"}
