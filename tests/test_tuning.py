"""Tuning: real Optuna studies on the state database, trials as real Ray tasks, MLflow as the mirror."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from orchestrator import tuning
from orchestrator.grids import GridError, expand_grid, load_grid
from orchestrator.state import StateStore, default_state_url
from orchestrator.tuning import TuneError, run_study
from tests.helpers import ROOT
from workers.recipes import resolve_recipe

# 100 iterations of a tiny network on synthetic data: chance is 90 % error, a good LR reaches a few %.
# An evaluation every 10 iterations gives the pruner ten looks; augmentation off so 100 steps suffice.
BASE = {"base": "smoke", "iterations": 100, "eval_every": 10, "checkpoint_every": 100, "milestones": [70],
        "warmup_iterations": 0, "augment": False}
SPEC = {"name": "lr-study", "dataset": "synthetic", "subset": 1024, "validation": 0.2, "depth": 8,
        "block": "basic", "width": 4, "base": BASE, "space": {"lr": {"low": 1e-4, "high": 1.0, "log": True}},
        "n_trials": 8, "pruner": "median", "parallel": 2}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """One MLflow store for the module (creating its tables costs seconds); each study has its experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def states(name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=default_state_url()).get_trials(deepcopy=False)


def test_study_finds_the_lr_region_prunes_and_is_tracked(ablate_home, local_ray, tracking):
    out = run_study(SPEC, tracking_uri=tracking)
    assert out["n_complete"] + out["n_pruned"] == 8 and out["n_failed"] == 0 and out["asked"] == 8
    assert out["n_pruned"] >= 1, "the median pruner stopped no trial"

    trials = states("lr-study")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    worst = max(t.value for t in complete)
    best_lr = out["best_params"]["lr"]
    assert out["best_value"] < 40 and worst - out["best_value"] > 20
    assert 2e-3 < best_lr < 0.9, f"best lr {best_lr} sits at an absurd end of the range"
    assert out["best_recipe"] == {**out["best_recipe"], "lr": best_lr, "iterations": 100, "milestones": [70]}
    for t in trials:  # validation errors at every evaluation; pruned trials stopped early
        steps = sorted(t.intermediate_values)
        assert steps[0] == 10 and (steps[-1] == 100) == (t.state.name == "COMPLETE")
        assert t.user_attrs["history"][-1]["val_error"] == pytest.approx(t.intermediate_values[steps[-1]])

    # The best recipe is saved under the study name and a grid can use it.
    record = {r["name"]: r for r in StateStore().tuned_records()}["lr-study"]
    assert (record["study"], record["trial"], record["value"]) == ("lr-study", out["best_trial"], out["best_value"])
    grid = load_grid({"name": "g", "dataset": "synthetic", "subset": 256, "recipe": "tuned/lr-study", "depths": [8],
                      "block": "basic", "width": 4, "variants": ["original"], "seeds": 1})
    assert expand_grid(grid, tuned=StateStore().tuned_recipes())[0].config.recipe.lr == best_lr

    # MLflow: an experiment named after the study, a parent run, one child per trial with its curve.
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name("lr-study").experiment_id
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.data.tags["ablate.study"] == "lr-study" and parent.info.status == "FINISHED"
    kids = client.search_runs([exp], f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'")
    by_number = {int(r.data.tags["optuna.trial"]): r for r in kids}
    assert sorted(by_number) == list(range(8))
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags["ablate.study"] == "lr-study" and run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == ("FINISHED" if t.state.name == "COMPLETE" else "KILLED")
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        history = client.get_metric_history(run.info.run_id, "val_error")
        assert sorted(m.step for m in history) == sorted(t.intermediate_values)

    # Rerunning a finished study asks nothing (and starts no Ray).
    again = run_study(SPEC, tracking_uri=tracking)
    assert (again["asked"], again["best_trial"], again["n_complete"]) == (0, out["best_trial"], out["n_complete"])


def test_resumed_study_after_a_kill_repeats_nothing(ablate_home, local_ray, tracking, monkeypatch):
    spec = {**SPEC, "name": "resume", "n_trials": 3, "pruner": "none",
            "base": {**BASE, "iterations": 40, "milestones": [30]}}
    code = "import json, sys; from orchestrator.tuning import run_study; run_study(json.loads(sys.argv[1]))"
    tuning.open_storage(StateStore().url)  # tables first: the test polls them while the study runs
    # The driver joins the test's Ray as drivers join a cluster (and starts in seconds, not half a minute).
    env = {**os.environ, "ABLATE_STALE_AFTER_S": "2", "MLFLOW_TRACKING_URI": tracking,
           "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if any(t.state.name == "COMPLETE" for t in states("resume")):
                    break
            except KeyError:  # the study does not exist yet
                pass
            assert proc.poll() is None, "the study ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("no trial completed in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    before = {t.number: t for t in states("resume")}
    done = {n: (t.params, t.value) for n, t in before.items() if t.state.name == "COMPLETE"}
    killed = [n for n, t in before.items() if t.state.name == "RUNNING"]
    assert done and len(done) + len(killed) <= 3

    monkeypatch.setattr(tuning.storage, "STALE_AFTER_S", 2.0)  # as the killed driver ran: stale after 2 s
    out = run_study(spec, tracking_uri=tracking)
    after = {t.number: t for t in states("resume")}
    assert out["n_complete"] == 3 and out["n_failed"] == len(killed) and out["asked"] == 3 - len(done)
    assert len(after) == 3 + len(killed)
    assert all(after[n].state.name == "FAIL" for n in killed)
    assert {n: (after[n].params, after[n].value) for n in done} == done  # completed trials untouched
    lrs = [t.params["lr"] for t in after.values() if t.state.name == "COMPLETE"]
    assert len(set(lrs)) == 3, "a resumed study replayed the first run's samples"
    # Every trial, the killed ones too, reached MLflow (the killed ones logged by the resumed run).
    client = MlflowClient(tracking)
    kids = client.search_runs([client.get_experiment_by_name("resume").experiment_id],
                              f"tags.mlflow.parentRunId = '{out['mlflow_run_id']}'")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in kids) == sorted(after)


def instant_trial(task: dict) -> dict:
    return {"value": 50.0 + task["number"], "evaluated_on": "validation", "history": []}


@pytest.mark.timeout(240)
def test_a_trial_left_without_any_heartbeat_is_failed_not_awaited(ablate_home, local_ray, tracking, monkeypatch):
    """A driver killed between Optuna's ask and its first heartbeat leaves a RUNNING trial that Optuna
    never calls stale; the next driver must still fail it and fill the study, not wait for it forever."""
    spec = {**SPEC, "name": "no-beat", "n_trials": 2}
    run_study({**spec, "n_trials": 1}, tracking_uri=tracking, trial_fn=instant_trial)
    storage = tuning.open_storage(default_state_url(), heartbeat=True)
    with pytest.warns(UserWarning, match="Heartbeat of storage"):  # Optuna's note on ask/tell with heartbeats
        orphan = optuna.load_study(study_name="no-beat", storage=storage).ask()  # asked, never beaten for
    assert {t.number: t.state.name for t in states("no-beat")}[orphan.number] == "RUNNING"

    monkeypatch.setattr(tuning.storage, "STALE_AFTER_S", 2.0)
    t0 = time.time()
    out = run_study(spec, tracking_uri=tracking, trial_fn=instant_trial)
    assert time.time() - t0 < 60, "the driver waited far past the stale threshold"
    after = {t.number: t.state.name for t in states("no-beat")}
    assert after == {0: "COMPLETE", orphan.number: "FAIL", orphan.number + 1: "COMPLETE"}
    assert (out["n_complete"], out["n_failed"]) == (2, 1)


def crashing_trial(task: dict) -> dict:
    raise RuntimeError(f"boom in trial {task['number']}")


def test_crashed_trials_are_marked_failed_not_lost(ablate_home, local_ray, tracking):
    out = run_study({**SPEC, "name": "crash", "n_trials": 2}, tracking_uri=tracking, trial_fn=crashing_trial)
    assert (out["n_failed"], out["n_complete"], out["best_value"], out["tuned_recipe"]) == (2, 0, None, None)
    assert all(t.state.name == "FAIL" and "boom in trial" in t.user_attrs["error"] for t in states("crash"))
    assert "crash" not in StateStore().tuned_recipes()


@pytest.mark.parametrize("change, message", [
    ({"space": {}}, "space: give at least one field to tune"),
    ({"space": {"batch_size": {"low": 16, "high": 64}}}, "space.batch_size: not a tunable field; tunable: lr,"),
    ({"space": {"lr": {"low": 0.1, "high": 0.01}}}, "space.lr: low (0.1) must be below high (0.01)"),
    ({"space": {"lr": {"low": 0.1, "high": 0.1}}}, "space.lr: low (0.1) must be below high (0.1)"),
    ({"space": {"lr": {"low": 0, "high": 1, "log": True}}}, "space.lr: a log scale needs low > 0"),
    ({"space": {"lr": {"low": 0.01}}}, "space.lr: a range needs both low and high"),
    ({"space": {"lr": {"choices": []}}}, "space.lr: choices must be a non-empty list"),
    ({"space": {"lr": {"choices": [0.1, 0.1]}}}, "space.lr: choices repeat"),
    ({"space": {"lr": {"low": 0.01, "high": 1, "step": 2}}}, "space.lr: unknown key 'step'"),
    ({"space": {"lr": {"low": "a", "high": 1}}}, "space.lr: expects numbers"),
    ({"space": {"warmup_iterations": {"low": 0, "high": 10.5}}}, "space.warmup_iterations: an integer field"),
    ({"space": {"warmup_iterations": {"low": 0, "high": 100}}}, "space.warmup_iterations: 100 makes an invalid recipe"),
    ({"space": {"lr": {"low": 0.01, "high": 1000}}}, "space.lr: 1000 makes an invalid recipe"),
    ({"space": {"momentum": {"choices": [0.9, 1.0]}}}, "space.momentum: 1.0 makes an invalid recipe"),
    ({"space": {"milestone_fractions": {"low": 0.1, "high": 0.9}}}, "space.milestone_fractions: the schedule's shape"),
    ({"space": {"milestone_fractions": {"choices": [[0.75, 0.5]]}}}, "fractions must be strictly increasing"),
    ({"space": {"milestone_fractions": {"choices": [[0.5, 1.5]]}}}, "a list of fractions of the run in (0, 1)"),
    ({"space": {"milestone_fractions": {"choices": [[0.5, 0.501]]}}}, "milestones must be strictly increasing"),
    ({"validation": 0}, "validation: Input should be greater than 0"),
    ({"pruner": "asha"}, "pruner: Input should be 'median', 'hyperband' or 'none'"),
    ({"variant": "nope"}, "variant: unknown variant 'nope'; catalogue:"),
    ({"base": "nope"}, "base: unknown recipe 'nope'"),
    ({"depth": 9}, "model:"),
    ({"name": "Bad Name"}, "name: String should match pattern"),
    ({"extra": 1}, "extra: Extra inputs are not permitted"),
])
def test_invalid_specs_are_one_line_errors(ablate_home, change, message):
    with pytest.raises(TuneError) as info:
        run_study({**SPEC, **change})
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_milestone_fractions_become_iterations():
    base = resolve_recipe(BASE)
    recipe = tuning.trial_recipe(base, {"milestone_fractions": "0.5,0.75", "lr": 0.2})
    assert (recipe.milestones, recipe.lr) == ((50, 75), 0.2)
    assert tuning.trial_recipe(base, {"milestone_fractions": "none"}).milestones == ()
    space = tuning.search_space(tuning.parse_tune_spec(
        {**SPEC, "space": {"milestone_fractions": {"choices": [[0.5, 0.75], []]}, "warmup_iterations":
                           {"low": 0, "high": 20}}}), base)
    assert space["milestone_fractions"].choices == ("0.5,0.75", "none") and space["warmup_iterations"].high == 20


def test_tuned_recipes_resolve_in_grids(ablate_home):
    recipe = {**resolve_recipe("smoke").model_dump(), "lr": 0.03}
    StateStore().save_tuned({"name": "mine", "study": "mine", "trial": 4, "value": 3.5, "recipe": recipe,
                             "params": {"lr": 0.03}, "spec": {"dataset": "synthetic"}})
    tuned = StateStore().tuned_recipes()
    grid = {"name": "g", "dataset": "synthetic", "depths": [8], "block": "basic", "width": 4,
            "variants": ["original"], "seeds": 1}
    assert expand_grid(load_grid({**grid, "recipe": "tuned/mine"}), tuned=tuned)[0].config.recipe.lr == 0.03
    trial = expand_grid(load_grid({**grid, "recipe": {"base": "tuned/mine", "eval_every": 10}}), tuned=tuned)[0]
    assert (trial.config.recipe.lr, trial.config.recipe.eval_every) == (0.03, 10)
    with pytest.raises(GridError, match="unknown recipe 'tuned/other'.*tuned: mine"):
        expand_grid(load_grid({**grid, "recipe": "tuned/other"}), tuned=tuned)


def curve(config, sink, **_) -> dict:
    """A stand-in trainer: validation error falls fastest near lr 0.1 and stays at chance far from it."""
    recipe = config.recipe
    quality = max(0.0, 1.0 - abs(math.log10(recipe.lr) + 1.0) / 2.0)  # 1 at lr 0.1, 0 below 1e-3 or above 10
    history = []
    for step in range(recipe.eval_every, recipe.iterations + 1, recipe.eval_every):
        record = {"test_error": 90.0 - 85.0 * quality * step / recipe.iterations, "train_loss": 1.0}
        history.append({"step": step, **record})
        sink.log(record, step)
    return {"test_error": history[-1]["test_error"], "status": "finished", "evaluated_on": "validation",
            "history": history}


def curve_trial(task: dict) -> dict:
    return tuning.execute_tuning_trial(task, train=curve)


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_pruners_stop_poor_curves_through_the_real_task(ablate_home, local_ray, tracking, pruner):
    spec = {**SPEC, "name": f"curves-{pruner}", "n_trials": 12, "pruner": pruner,
            "base": {**BASE, "iterations": 90, "eval_every": 10}}
    out = run_study(spec, tracking_uri=tracking, trial_fn=curve_trial)
    assert out["n_complete"] + out["n_pruned"] == 12 and out["n_failed"] == 0
    assert out["n_pruned"] >= 2 and 0.01 < out["best_params"]["lr"] < 1.0
    for t in states(f"curves-{pruner}"):
        if t.state.name == "PRUNED":  # stopped before its last evaluation, never after it
            assert max(t.intermediate_values) < 90
