"""Grids on a real local Ray with a real MLflow server: reuse, growth, the run tree, crashes, Ctrl-C."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ablations.vocabulary import STATUSES
from orchestrator import scheduler
from orchestrator.grids import load_grid
from orchestrator.scheduler import GridInterrupted, GridRunner
from orchestrator.state import StateStore
from orchestrator.tracking import Tracker, default_tracking_uri, ui_url
from tests.helpers import ARTIFACTS, ROOT, ablate, chromium, render_in_browser, wait_for

SMOKE = {"name": "smoke-t", "dataset": "synthetic", "subset": 512, "recipe": "smoke", "depths": [8],
         "block": "basic", "width": 4, "variants": ["original", "full_preact"], "seeds": 2}


def children(client, parent_run_id):
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'")


def table_artifact(client, run_id, path):
    """A table artifact (MLflow's "split" layout: columns and data) as a list of row dicts."""
    content = json.loads(Path(client.download_artifacts(run_id, path, tempfile.mkdtemp())).read_text())
    return [dict(zip(content["columns"], row)) for row in content["data"]]


def test_grid_runs_once_reuses_and_grows(ablate_home, local_ray, mlflow_server):
    runner = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), progress=False)
    first = runner.run(load_grid(SMOKE))
    assert (first["trials"], first["executed"], first["reused"]) == (4, 4, 0)
    assert first["counts"]["finished"] == 4 and first["mlflow_unsynced"] == 0

    again = runner.run(load_grid(SMOKE))
    assert (again["grid"], again["executed"], again["reused"]) == (first["grid"], 0, 4)
    shown = MlflowClient(mlflow_server.uri).get_run(again["mlflow_run_id"])  # as the first run left it
    assert shown.info.status == "FINISHED" and shown.data.tags["ablate.state"] in ("finished", "decided")

    grown = runner.run(load_grid({**SMOKE, "seeds": 3}))
    assert (grown["trials"], grown["executed"], grown["reused"]) == (6, 2, 4)

    # The MLflow run tree, read back from the server: the grown grid (another grid id, the same name) keeps
    # the parent run and adds child runs for its two new trials only.
    client = MlflowClient(mlflow_server.uri)
    assert grown["mlflow_run_id"] == first["mlflow_run_id"]
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["ablate.grid"] == grown["grid"]
    assert parent.data.tags["ablate.grids"] == f"{first['grid']},{grown['grid']}"
    assert parent.data.tags["ablate.state"] in ("finished", "decided")
    assert "smoke-t" in parent.data.tags["mlflow.note.content"]
    kids = children(client, first["mlflow_run_id"])
    assert len(kids) == 6 == len({r.data.tags["ablate.trial"] for r in kids})
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    store = StateStore()
    by_key = {t["key"]: t for t in store.grid_trials(grown["grid"])}
    for run in kids:
        tags = run.data.tags
        trial = by_key[tags["ablate.trial"]]
        assert run.info.run_id == trial["mlflow_run_id"]
        assert (tags["ablate.variant"], tags["ablate.depth"], tags["ablate.seed"]) == (
            trial["variant"], "8", str(trial["seed"]))
        assert tags["ablate.status"] == "finished" and tags["ablate.dataset"] == "synthetic"
        assert tags["ablate.unit"] in ("original", "full_preact") and run.info.status == "FINISHED"
        assert tags["ablate.code_version"] and tags["ablate.iteration"] == "40/40"
        history = client.get_metric_history(run.info.run_id, "test_error")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [20, 40]
        assert run.data.metrics["test_error"] == pytest.approx(trial["test_error"])
        assert run.data.params["recipe.iterations"] == "40" and run.data.params["seed"] == str(trial["seed"])
        inputs = {(d.dataset.name, d.tags[0].value): d.dataset.digest for d in run.inputs.dataset_inputs}
        assert inputs == {(i["name"], i["context"]): i["digest"] for i in trial["result"]["inputs"]}
        assert set(inputs) == {("synthetic[:512]", "train"), ("synthetic[:512]", "test")}

    # The comparison on the parent: the rows `ablate compare --format json` prints, shown as a table, with the
    # cells as metrics and decisions, and the report.
    compared = ablate("compare", grown["grid"], "--format", "json")
    assert compared.code == 0, compared.err
    assert table_artifact(client, parent.info.run_id, "comparison.json") == compared.json["rows"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"comparison.json", "reused_trials.json",
                                                                          "report.html"}
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == [
        {"path": "comparison.json", "type": "table"}, {"path": "reused_trials.json", "type": "table"}]
    for row in compared.json["rows"]:
        cell = f"synthetic-d8/{row['variant']}"
        assert parent.data.metrics[f"{cell}/mean"] == pytest.approx(row["mean"])
        assert parent.data.metrics[f"{cell}/n"] == 3 and parent.data.tags[f"{cell}/decision"] == row["decision"]
    assert parent.data.metrics["trials_finished"] == 6 and parent.data.tags["ablate.progress"].startswith("6/6 done")
    assert table_artifact(client, parent.info.run_id, "reused_trials.json") == []

    # Another grid (another name) made of the same trials trains nothing and logs no run twice: its parent has
    # no child runs and links the four runs it reused.
    other = runner.run(load_grid({**SMOKE, "name": "smoke-other-t"}))
    assert (other["executed"], other["reused"], other["mlflow_unsynced"]) == (0, 4, 0)
    assert other["mlflow_run_id"] != parent.info.run_id and children(client, other["mlflow_run_id"]) == []
    reused = table_artifact(client, other["mlflow_run_id"], "reused_trials.json")
    assert sorted(r["run"] for r in reused) == sorted(t["mlflow_run_id"] for t in by_key.values() if t["seed"] < 2)
    assert all(r["link"] == f"{mlflow_server.uri}/#/runs/{r['run']}" for r in reused)
    assert [r["n"] for r in table_artifact(client, other["mlflow_run_id"], "comparison.json")] == [2, 2]
    assert len(client.search_runs([parent.info.experiment_id])) == 7  # still one parent and six trials


LIVE = {**SMOKE, "name": "live-t", "recipe": {"base": "smoke", "iterations": 160, "eval_every": 20,
                                              "checkpoint_every": 40, "milestones": [120]}}


@pytest.fixture(scope="module")
def watched(tmp_path_factory, local_ray, mlflow_server):
    """A grid of four trials on two slots, its MLflow runs read all along as a user would: each child run's
    states (status, its `ablate.status` tag, train_loss points so far, whether the state store still said the
    trial was running after those points were read) and the parent's progress tags."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ABLATE_HOME", str(tmp_path_factory.mktemp("live") / "home"))
        for var in ("ABLATE_STATE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "ABLATE_CHECKPOINT_DIR"):
            env.delenv(var, raising=False)
        env.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # a trial lasts seconds here
        store, client, spec = StateStore(), MlflowClient(mlflow_server.uri), load_grid(LIVE)
        runner = GridRunner(store=store, tracker=Tracker(mlflow_server.uri), progress=False)
        out: dict = {}
        driver = threading.Thread(target=lambda: out.update(runner.run(spec)))
        driver.start()
        seen: dict[str, list[tuple]] = {}
        parent_seen: list[tuple] = []

        def observe() -> bool:
            ended = not driver.is_alive()
            experiment = client.get_experiment_by_name(spec.name)
            for run in client.search_runs([experiment.experiment_id]) if experiment else []:
                tags = run.data.tags
                if "ablate.trial" not in tags:
                    parent_seen.append((tags.get("ablate.state"), tags.get("ablate.progress"), tags.get("ablate.eta")))
                    continue
                points = len(client.get_metric_history(run.info.run_id, "train_loss"))
                state = (run.info.status, tags["ablate.status"], points,
                         store.trial(tags["ablate.trial"]).status == "running")
                if seen.setdefault(run.info.run_id, [state])[-1] != state:
                    seen[run.info.run_id].append(state)
            return ended

        assert wait_for(observe, 900)
        yield spec, out, seen, parent_seen


def test_child_runs_go_scheduled_running_with_live_points_then_finished(watched, mlflow_server):
    spec, out, seen, parent_seen = watched
    assert out["counts"]["finished"] == 4 and out["mlflow_unsynced"] == 0 and len(seen) == 4
    order = ["SCHEDULED", "RUNNING", "FINISHED"]
    for run_id, states in seen.items():
        # MLflow makes every run RUNNING; the driver sets it SCHEDULED with its next call, so a reader can catch
        # that instant, in which the run is still tagged queued.
        made = states[:1] if states[0][:3] == ("RUNNING", "queued", 0) else []
        statuses = list(dict.fromkeys(status for status, _, _, _ in states[len(made):]))
        assert statuses == [s for s in order if s in statuses] and statuses[-1] == "FINISHED", states
        # Points read while the trial was still running, by the state store's own account.
        assert any(status == "RUNNING" and points and training for status, _, points, training in states), states
    # Two trials waited in Ray's queue behind the first two: SCHEDULED, not RUNNING, meanwhile.
    assert sum("SCHEDULED" in {s[0] for s in states} for states in seen.values()) >= 2, seen
    client = MlflowClient(mlflow_server.uri)
    for run_id in seen:
        run = client.get_run(run_id)
        assert run.data.tags["ablate.iteration"] == "160/160" and run.data.tags["ablate.eta"] == "0s"
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    # The parent said how far the grid was while it ran, then that it ended.
    assert any(state == "running" and progress and "running" in progress for state, progress, _ in parent_seen)
    assert any(eta not in (None, "–", "0s") for _, _, eta in parent_seen), parent_seen
    assert parent_seen[-1][0] in ("finished", "decided") and parent_seen[-1][2] == "0s"


class _Roles(HTMLParser):
    """The text of the elements of a page with an ARIA role (MLflow's UI draws its tables with them)."""
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.found: list[list] = []  # [role, text] in document order
        self.stack: list[list | None] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        role = dict(attrs).get("role")
        entry = [role, ""] if role else None
        if entry:
            self.found.append(entry)
        if tag not in self.VOID:
            self.stack.append(entry)

    def handle_endtag(self, tag):
        if self.stack:
            self.stack.pop()

    def handle_data(self, data):
        for entry in self.stack:
            if entry:
                entry[1] += data

    def texts(self, role: str) -> list[str]:
        return [text.strip() for r, text in self.found if r == role]


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (make setup installs it)")
def test_the_mlflow_ui_opens_on_the_runs_with_the_comparison_and_live_charts(watched, mlflow_server):
    """Headless Chromium on the MLflow UI as `ablate run` points a user to it."""
    spec, out, seen, _ = watched
    ARTIFACTS.mkdir(exist_ok=True)
    base, experiment, parent = mlflow_server.uri, out["mlflow_experiment_id"], out["mlflow_run_id"]

    def shows(*texts: str) -> str:  # a page condition: the page's text holds all of these
        return " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)

    page = render_in_browser(ui_url(base, experiment), ARTIFACTS / "mlflow-runs.png",
                             until=shows("matching runs", "Run Name", spec.name), size="1600,1000")
    text = re.sub(r"<[^>]+>", " ", page)
    assert "matching runs" in text and "Run Name" in text and spec.name in text  # the runs table
    assert "Detect Issues" not in text and "No data available" not in text  # not the GenAI traces overview

    page = render_in_browser(f"{base}/#/experiments/{experiment}/runs/{parent}?workflowType=machine_learning",
                             ARTIFACTS / "mlflow-parent.png",
                             until=shows("Reading the comparison", "ablate.progress"), size="1600,1400")
    text = re.sub(r"<[^>]+>", " ", page)
    assert f"Ablate grid {spec.name}" in re.sub(r"\s+", " ", text) and "Reading the comparison" in text
    assert "ablate.state" in text and "ablate.progress" in text

    page = render_in_browser(f"{base}/#/experiments/{experiment}/runs/{parent}/artifacts/comparison.json"
                             "?workflowType=machine_learning", ARTIFACTS / "mlflow-parent-table.png",
                             until=shows("View as table") + " && document.querySelector('[role=cell]') !== null",
                             size="1600,1000")
    roles = _Roles(page)
    rows = table_artifact(MlflowClient(base), parent, "comparison.json")
    assert "View as table" in page and roles.texts("columnheader") == list(rows[0])
    cells = roles.texts("cell")
    width = len(rows[0])
    shown = [dict(zip(rows[0], cells[i:i + width])) for i in range(0, len(cells), width)]
    assert [(r["variant"], r["decision"], r["n"]) for r in shown] == [
        (r["variant"], r["decision"], str(r["n"])) for r in rows]
    assert [json.loads(r["setting"]) for r in shown] == [r["setting"] for r in rows]

    child = MlflowClient(base).get_run(next(iter(seen)))
    url = f"{base}/#/experiments/{experiment}/runs/{child.info.run_id}/model-metrics?workflowType=machine_learning"
    legends = [f"{child.info.run_name} ({metric})" for metric in ("train_loss", "test_error", "lr")]
    page = render_in_browser(url, ARTIFACTS / "mlflow-child-metrics.png", size="1600,1000",
                             until=shows(*legends) + " && document.querySelectorAll('svg.main-svg').length >= 6")
    for metric in ("train_loss", "test_error", "lr"):
        assert f"{child.info.run_name} ({metric})</span>" in page  # each chart's legend: the run and its metric
    assert page.count('class="main-svg"') >= 6  # the charts drawn (plotly: two SVG layers per chart)
    assert (ARTIFACTS / "mlflow-child-metrics.png").stat().st_size > 20_000


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
            # Entries hold training metrics at log steps and test metrics at evaluations, alike for both.
            assert (f.keys(), f["step"], f.get("lr")) == (a.keys(), a["step"], a.get("lr"))
            if "train_loss" in f:
                assert f["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
            if "test_error" in f:
                assert abs(f["test_error"] - a["test_error"]) <= 1.0


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own niceness is Linux's")
def test_mlflow_threads_yield_the_cpu_to_the_scheduling_loop(ablate_home):
    runner = GridRunner(progress=False)
    nice = lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # noqa: E731
    loop = nice()
    assert runner._syncer.submit(nice).result() == runner._calls.submit(nice).result() == min(19, loop + scheduler.MLFLOW_NICE)
    assert nice() == loop  # the calling thread, and so the loop, keep theirs


def test_a_run_made_after_its_trial_had_one_is_deleted_when_the_grid_ends(ablate_home, local_ray, mlflow_server):
    """A dead driver's create_run still queued at the server lands after its successor adopted or made the
    trial's run: the grid's next end deletes it, so each trial keeps exactly one child run."""
    spec = load_grid({**SMOKE, "name": "late-t", "seeds": 1})
    out = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), progress=False).run(spec)
    trial = StateStore().grid_trials(out["grid"])[0]
    tracker = Tracker(mlflow_server.uri)
    late = tracker.start_trial(spec.name, out["grid"], out["mlflow_run_id"], trial, json.loads(trial["config"]))
    client = MlflowClient(mlflow_server.uri)
    assert len(children(client, out["mlflow_run_id"])) == 3

    again = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), progress=False).run(spec)
    assert again["executed"] == 0 and again["mlflow_unsynced"] == 0
    kids = children(client, out["mlflow_run_id"])
    assert sorted(r.data.tags["ablate.trial"] for r in kids) == sorted(t["key"] for t in StateStore().grid_trials(out["grid"]))
    assert late not in {r.info.run_id for r in kids} and client.get_run(late).info.lifecycle_stage == "deleted"
    assert {r.info.run_id for r in kids if r.data.tags["ablate.trial"] == trial["key"]} == {trial["mlflow_run_id"]}


def test_failing_trials_retry_then_error(ablate_home, local_ray, tmp_path):
    spec = load_grid({**SMOKE, "name": "broken", "dataset": "cifar10", "data_dir": str(tmp_path / "nothing"),
                      "seeds": 1, "variants": ["original"], "max_retries": 1})
    out = GridRunner(progress=False).run(spec, sync_timeout_s=0)
    assert out["counts"]["error"] == 1 and out["executed"] == 0
    trial = StateStore().grid_trials(out["grid"])[0]
    assert trial["attempts"] == 2 and "cifar-10-batches-py" in trial["error"]


def instant_trial(task: dict) -> dict:
    """A trial that only returns a result: what is tested is what happens around it."""
    return {"status": "finished", "test_error": 50.0, "train_loss": 1.0, "train_error": 50.0, "history": [],
            "iterations": 40}


def test_a_large_new_grid_runs_its_first_trials_while_the_rest_are_recorded(ablate_home, local_ray,
                                                                           monkeypatch):
    """A new grid past FIRST_RECORDED trials starts on its first ones and records the rest beside the loop: here
    the rest is recorded only once a first trial has ended, which a loop waiting for it would never see."""
    monkeypatch.setattr(scheduler, "FIRST_RECORDED", 2)
    spec = load_grid({**SMOKE, "name": "recorded-later", "seeds": 3})
    runner = GridRunner(store=StateStore(), tracker=Tracker("http://127.0.0.1:9"), trial_fn=instant_trial,
                        progress=False)
    register, recorded = runner._register, []

    def record(spec_, grid_id, trials):
        recorded.append(len(trials))
        if len(recorded) == 2:
            assert wait_for(lambda: runner.store.counts(grid_id)["finished"] >= 1, timeout=120)
        register(spec_, grid_id, trials)
    runner._register = record
    out = runner.run(spec, sync_timeout_s=0)
    assert recorded == [2, 4]
    assert (out["trials"], out["executed"], out["counts"]["finished"]) == (6, 6, 6)

    again = runner.run(spec, sync_timeout_s=0)   # a grid seen before is recorded whole, and nothing runs twice
    assert recorded == [2, 4, 6] and (again["trials"], again["executed"], again["reused"]) == (6, 0, 6)


def test_mlflow_down_delays_the_runs_never_the_trials_and_the_runs_catch_up(ablate_home, local_ray,
                                                                            mlflow_server):
    """The state store's record is the truth: with MLflow unreachable the grid still runs to the end and says
    how many runs lag; the next run with MLflow back makes each missing run, final, from the record."""
    spec = load_grid({**SMOKE, "name": "lagging-t"})
    down = GridRunner(store=StateStore(), tracker=Tracker("http://127.0.0.1:9"), trial_fn=instant_trial,
                      progress=False)
    out = down.run(spec, sync_timeout_s=0)
    assert out["counts"]["finished"] == out["executed"] == 4 and out["mlflow_unsynced"] == 4
    status = ablate("status", out["grid"], "--json")
    assert status.code == 0 and (status.json["finished"], status.json["mlflow_unsynced"]) == (4, 4)

    back = GridRunner(store=StateStore(), tracker=Tracker(mlflow_server.uri), trial_fn=instant_trial,
                      progress=False).run(spec)
    assert (back["executed"], back["mlflow_unsynced"]) == (0, 0)
    assert ablate("status", out["grid"], "--json").json["mlflow_unsynced"] == 0
    client = MlflowClient(mlflow_server.uri)
    kids = children(client, back["mlflow_run_id"])
    by_key = {t["key"]: t for t in StateStore().grid_trials(out["grid"])}
    assert sorted(r.data.tags["ablate.trial"] for r in kids) == sorted(by_key)
    for run in kids:
        trial = by_key[run.data.tags["ablate.trial"]]
        assert run.info.run_id == trial["mlflow_run_id"] and run.info.status == "FINISHED"
        assert (run.data.tags["ablate.status"], run.data.tags["ablate.iteration"]) == ("finished", "40/40")
        assert run.data.params["seed"] == str(trial["seed"]) and run.data.params["recipe.iterations"] == "40"
    assert client.get_run(back["mlflow_run_id"]).data.metrics["mlflow_unsynced"] == 0


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
        def claim_many(self, keys, owner, **kw):
            super().claim_many(keys, owner, **kw)
            raise KeyboardInterrupt

    runner = GridRunner(store=InterruptedAfterClaim(), progress=False)
    spec = load_grid({**SMOKE, "name": "claim-interrupted", "seeds": 1})
    with pytest.raises(GridInterrupted):
        runner.run(spec, sync_timeout_s=0)
    assert StateStore().counts(spec.grid_id()) == {**dict.fromkeys(STATUSES, 0), "queued": 2}
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
