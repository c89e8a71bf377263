"""MLflow: one experiment per grid name, a parent run per grid, a child run per trial.

Two writers, one truth. While a trial trains, `MlflowSink` (inside the Ray worker) ships its metrics in
batches from a background thread, so users watch runs live in the MLflow UI and the training loop never
waits on the network. The trial's own record (its result history) is the truth: when a trial ends, the
driver `sync`s its child run against that record, logging whatever the live path lost (server down,
worker killed), and only then marks the run terminated. Unsynced runs stay flagged in the state store and
are synced on the next pass, so a metric is never lost while MLflow is unreachable.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any

from workers.sinks import MetricsSink

from .state import ablate_home

# Fail fast inside MLflow's client and let our buffers and retries carry an outage instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

# The history's metrics a sync brings into a child run. ImageNet-style trials add the top-5 error, and the
# second evaluation crop's errors and loss under the crop's name (workers/imagefolder.py).
METRICS = ("train_loss", "train_error", "test_error", "test_loss", "lr", "img_per_s", "test_error_top5",
           "test_error_224", "test_error_top5_224", "test_loss_224")
PARAM_LIMIT = 6000
ARTIFACT_CAP_BYTES = int(float(os.environ.get("ABLATE_ARTIFACT_CAP_MB", "64")) * 2**20)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ablate_home() / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000"


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else k, v))
        return out
    return {prefix: str(value)[:PARAM_LIMIT]}


class MlflowSink(MetricsSink):
    """Buffers metrics and logs them in batches from a daemon thread; never raises into training."""

    def __init__(self, uri: str, run_id: str, flush_every: float = 2.0, close_timeout: float = 10.0):
        self.uri, self.run_id, self.flush_every, self.close_timeout = uri, run_id, flush_every, close_timeout
        self._buffer: list[Any] = []
        self.steps: set[int] = set()  # every step logged through this sink
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-sink", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        with self._lock:
            self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
            self.steps.add(step)

    def _flush(self) -> bool:
        with self._lock:
            batch, self._buffer = self._buffer[:1000], self._buffer[1000:]
        if not batch:
            return True
        try:
            _client(self.uri).log_batch(self.run_id, metrics=batch)
            return True
        except Exception:
            with self._lock:
                self._buffer = batch + self._buffer  # keep order; try again later
            return False

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_every)
            self._wake.clear()
            self._flush()

    def delivered(self, result: dict[str, Any]) -> bool:
        """After `close`: this sink logged every step of the trial's record and all of it reached the server
        (not so for a resumed trial, whose earlier steps another attempt logged, or failed to)."""
        steps = {h["step"] for h in result.get("history", [])}
        if result.get("diverged_at") is not None:
            steps.add(result["diverged_at"])
        return self._stop and not self._buffer and steps <= self.steps

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        deadline = time.time() + self.close_timeout
        while self._buffer and time.time() < deadline:
            if not self._flush():
                break  # server unreachable: don't hold the slot; the driver's sync logs the rest
        # Whatever is still buffered is in the trial's result history; the driver's sync logs it.


class Tracker:
    """Driver-side MLflow bookkeeping. Every call may raise when the server is unreachable; callers treat
    that as 'try again later' (see `sync`)."""

    def __init__(self, uri: str | None = None):
        self.uri = uri or default_tracking_uri()
        self._experiments: dict[str, str] = {}

    @property
    def client(self):
        return _client(self.uri)

    def experiment(self, name: str) -> str:
        if name not in self._experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:"):
                    location = (ablate_home() / "mlartifacts").as_uri()
                exp_id = self.client.create_experiment(name, artifact_location=location)
            else:
                exp_id = exp.experiment_id
            self._experiments[name] = exp_id
        return self._experiments[name]

    def start_grid(self, name: str, grid_id: str, spec: dict) -> str:
        run = self.client.create_run(self.experiment(name), run_name=grid_id, tags={"ablate.grid": grid_id})
        from mlflow.entities import Param
        params = [Param(k, v) for k, v in flatten("", spec).items()][:100]
        self.client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def end_grid(self, run_id: str, counts: dict[str, int]) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(f"trials_{k}", v, now, 0) for k, v in counts.items()])
        self.client.set_terminated(run_id, "FINISHED" if counts.get("error", 0) == 0 else "FAILED")

    def tag_run(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, tags=items[i:i + 100])

    def start_trial(self, name: str, grid_id: str, parent_run_id: str, trial: dict[str, Any],
                    config: dict[str, Any]) -> str:
        from mlflow.entities import Param
        model = config["model"]
        tags = {"mlflow.parentRunId": parent_run_id, "ablate.grid": grid_id, "ablate.trial": trial["key"],
                "ablate.variant": trial["variant"], "ablate.unit": model["unit"], "ablate.shortcut": model["shortcut"],
                "ablate.depth": str(trial["depth"]), "ablate.dataset": trial["dataset"],
                "ablate.seed": str(trial["seed"]), "ablate.status": "running"}
        run = self.client.create_run(self.experiment(name), run_name=f"{trial['variant']}-d{trial['depth']}-s{trial['seed']}",
                                     tags=tags)
        params = [Param(k, v) for k, v in flatten("", config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i:i + 100])
        return run.info.run_id

    def child_runs(self, name: str, parent_run_id: str) -> dict[str, str]:
        """{trial key: run id} of the parent's child runs (one search, paged)."""
        found, token = {}, None
        while True:
            page = self.client.search_runs([self.experiment(name)], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                           max_results=1000, page_token=token)
            found.update({r.data.tags["ablate.trial"]: r.info.run_id for r in page if "ablate.trial" in r.data.tags})
            token = page.token
            if not token:
                return found

    def sync(self, run_id: str, result: dict[str, Any], status: str, checkpoint_dir: str | None = None,
             delivered: bool = False) -> None:
        """Make the child run hold every metric of the trial's own record, then terminate it.

        `delivered`: the trial's live sink logged its whole history to this run, so nothing is read back.
        """
        from mlflow.entities import Metric, RunTag
        client = self.client
        missing = []
        history = [] if delivered else result.get("history") or []
        for key in [m for m in METRICS if any(m in h for h in history)]:  # one read per metric it holds
            have = {m.step for m in client.get_metric_history(run_id, key)}
            missing += [Metric(key, float(h[key]), int(time.time() * 1000), int(h["step"]))
                        for h in history if h.get(key) is not None and h["step"] not in have]
        if not delivered and result.get("status") == "diverged" and result.get("diverged_at") is not None:
            have = {m.step for m in client.get_metric_history(run_id, "test_error")}
            if result["diverged_at"] not in have:
                missing.append(Metric("test_error", float(result["test_error"]), int(time.time() * 1000),
                                      int(result["diverged_at"])))
        for i in range(0, len(missing), 1000):
            client.log_batch(run_id, metrics=missing[i:i + 1000])
        client.log_batch(run_id, tags=[RunTag("ablate.status", status)])
        if checkpoint_dir:
            self._artifacts(run_id, checkpoint_dir)
        client.set_terminated(run_id, "FAILED" if status == "error" else "FINISHED")

    def _artifacts(self, run_id: str, checkpoint_dir: str) -> None:
        """The resolved config and result, and the final checkpoint while under the size cap."""
        from pathlib import Path
        from workers.checkpoint import checkpoints
        folder = Path(checkpoint_dir)
        result_file = folder / "result.json"
        if result_file.exists():
            self.client.log_artifact(run_id, str(result_file))
        found = checkpoints(folder)
        if found and found[0].stat().st_size <= ARTIFACT_CAP_BYTES:
            self.client.log_artifact(run_id, str(found[0]), artifact_path="checkpoint")
