"""The live MLflow sink against a real server: what it claims to have delivered is what the run holds."""
from __future__ import annotations

import socket

from mlflow.tracking import MlflowClient

from orchestrator.tracking import MlflowSink, Tracker


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
