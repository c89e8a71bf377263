"""MLflow against a real server: the live sink (what it claims to have delivered is what the run holds, the
run it starts, its progress), experiment kinds, and the names of the parent run's cell metrics."""
from __future__ import annotations

import posixpath
import socket

from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_metric_name

from orchestrator.parent_view import cell_summary, grid_state, table
from orchestrator.tracking import EXPERIMENT_KIND, MlflowSink, Tracker, dataset_inputs, ui_url
from tests.helpers import wait_for


def history(*steps: int) -> dict:
    return {"history": [{"step": s, "test_error": 10.0 + s} for s in steps], "diverged_at": None}


def test_a_sink_that_logged_every_step_of_the_record_is_delivered(mlflow_server):
    tracker = Tracker(mlflow_server.uri)
    run = tracker.client.create_run(tracker.experiment("sink-t")).info.run_id
    sink = MlflowSink(mlflow_server.uri, run, flush_every=0.05)
    for step in (10, 20):
        sink.log({"test_error": 10.0 + step, "lr": None}, step=step)
    sink.close()
    steps = sorted(m.step for m in MlflowClient(mlflow_server.uri).get_metric_history(run, "test_error"))
    assert steps == [10, 20]
    assert sink.delivered(history(10, 20))
    # A resumed trial's record holds steps an earlier attempt logged (or lost): not this sink's to vouch for.
    assert not sink.delivered(history(5, 10, 20))
    assert not sink.delivered({**history(10, 20), "status": "diverged", "diverged_at": 25})


def test_a_sink_whose_server_is_gone_is_not_delivered():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = MlflowSink(f"http://127.0.0.1:{port}", "0" * 32, flush_every=0.05, close_timeout=1.0)
    sink.log({"test_error": 12.0}, step=10)
    sink.close()
    assert not sink.delivered(history(10))


def one_trial(name="sink-live-t"):
    from orchestrator.grids import expand_grid, load_grid
    t = expand_grid(load_grid({"name": name, "dataset": "synthetic", "subset": 256, "recipe": "smoke", "depths": [8],
                               "block": "basic", "width": 4, "variants": ["original"], "seeds": 1}))[0]
    return t, {"key": t.key, "variant": t.variant, "depth": t.depth, "seed": t.seed, "dataset": t.dataset}


def test_a_sink_finds_its_scheduled_run_starts_it_and_shows_progress(mlflow_server):
    """The worker's side of a child run: SCHEDULED until the sink starts it, then RUNNING with the dataset
    inputs, live points, iteration and ETA; the sink finds the run by trial key when the task had no id."""
    tracker, (grid_trial, trial) = Tracker(mlflow_server.uri), one_trial()
    parent = tracker.start_grid("sink-live-t", "sink-live-t-0")
    run_id = tracker.start_trial("sink-live-t", "sink-live-t-0", parent, trial,
                                 grid_trial.config.model_dump(mode="json"))
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert (run.info.status, run.data.tags["ablate.status"]) == ("SCHEDULED", "queued")
    assert run.data.tags["ablate.code_version"] and run.data.tags["mlflow.source.name"] == "ablate"

    inputs = dataset_inputs(grid_trial.config, None)
    assert [i["context"] for i in inputs] == ["train", "test"] and inputs[0]["name"] == "synthetic[:256]"
    sink = MlflowSink(mlflow_server.uri, None, flush_every=0.05, inputs=inputs, find=("sink-live-t", trial["key"]))
    sink.begin(0, 40)
    sink.log({"train_loss": 2.0}, step=10)
    assert wait_for(lambda: client.get_run(run_id).info.status == "RUNNING", 30)
    sink.log({"train_loss": 1.5, "test_error": 60.0}, step=20)
    assert wait_for(lambda: client.get_run(run_id).data.tags.get("ablate.iteration") == "20/40", 30)
    run = client.get_run(run_id)
    assert run.data.tags["ablate.status"] == "running" and run.data.tags["ablate.eta"].endswith("s")
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [10, 20]
    logged = {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert logged == {(i["name"], i["digest"], i["context"]) for i in inputs}
    sink.close()
    assert sink.run_id == run_id and sink.delivered({"history": [{"step": 10}, {"step": 20}]})


def test_a_sink_that_never_finds_its_run_delivers_nothing(mlflow_server):
    sink = MlflowSink(mlflow_server.uri, None, flush_every=0.05, close_timeout=1.0, find=("no-such-grid", "0" * 20))
    sink.log({"test_error": 12.0}, step=10)
    sink.close()
    assert sink.run_id is None and not sink.delivered(history(10))


def test_experiments_open_on_their_training_runs(mlflow_server):
    """MLflow 3 opens an experiment without a kind in its GenAI view, on an empty traces page."""
    client = MlflowClient(mlflow_server.uri)
    assert client.get_experiment(Tracker(mlflow_server.uri).experiment("kind-new")).tags[EXPERIMENT_KIND[0]] == \
        EXPERIMENT_KIND[1]
    old = client.create_experiment("kind-old")  # as an older Ablate made them
    chosen = client.create_experiment("kind-chosen", tags={EXPERIMENT_KIND[0]: "genai_development"})
    tracker = Tracker(mlflow_server.uri)
    for name in ("kind-old", "kind-chosen"):
        tracker.experiment(name)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND[0]] == "genai_development"  # the user's choice stays
    assert ui_url("http://h:5000", old) == f"http://h:5000/#/experiments/{old}?workflowType=machine_learning"


def test_cell_metrics_name_setting_and_variant_within_mlflow_rules():
    doc = {"rows": [
        {"setting": {"dataset": "cifar10", "depth": 110}, "variant": "original", "n": 5, "mean": 6.6, "ci_low": 6.1,
         "ci_high": 7.1, "delta": None, "p_holm": None, "decision": "baseline"},
        {"setting": {"dataset": "cifar10", "depth": 110}, "variant": "scale-0.5", "n": 5, "mean": 12.0,
         "ci_low": 10.0, "ci_high": 14.0, "delta": 5.4, "p_holm": 0.01, "decision": "worse"},
        {"setting": {"dataset": "cifar10", "depth": 110}, "variant": "..", "n": 1, "mean": 7.0, "ci_low": None,
         "ci_high": None, "delta": 0.4, "p_holm": None, "decision": "undecided"}]}
    metrics, tags = cell_summary(doc)
    assert metrics["cifar10-d110/scale-0.5/mean"] == 12.0 and metrics["cifar10-d110/scale-0.5/decision"] == -1.0
    assert tags == {"cifar10-d110/original/decision": "baseline", "cifar10-d110/scale-0.5/decision": "worse",
                    "cifar10-d110/__/decision": "undecided"}
    assert metrics["cifar10-d110/__/decision"] == 0.0 and "cifar10-d110/original/decision" not in metrics
    assert "cifar10-d110/original/delta" not in metrics  # no value, no point
    for name in [*metrics, *tags]:
        _validate_metric_name(name)
        assert posixpath.normpath(name) == name
    assert grid_state({"queued": 0, "running": 0}, False, doc) == "finished"
    decided = {"rows": [r for r in doc["rows"] if r["variant"] != ".."]}
    assert grid_state({"queued": 0, "running": 0}, False, decided) == "decided"
    assert grid_state({"queued": 1, "running": 0}, False, decided) == "running"
    assert grid_state({"queued": 0, "running": 0}, True, decided) == "cancelled"
    assert table([{"b": 1, "a": 2}, {"a": 3, "c": 4}], ("a",)) == {"columns": ["a", "b", "c"],
                                                                   "data": [[2, 1, None], [3, None, 4]]}
