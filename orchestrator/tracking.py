"""MLflow: one experiment per grid name, one parent run per grid name, one child run per trial.

Experiments are tagged as model-training experiments (`mlflow.experimentKind`), so MLflow's UI opens them
on their runs, not on an empty GenAI traces page. What the parent run shows is built in `parent_view`.

A child run follows its trial: the driver creates it `SCHEDULED` (MLflow's own status) a few trials ahead
of submission; the worker's `MlflowSink` sets it `RUNNING` when the trial starts, logs its dataset splits as
inputs, starts MLflow's system-metrics monitor, and ships metrics, iteration and ETA in batches from a
background thread, so the training loop never waits on the network.

Two writers, one truth. The trial's own record (its result history and dataset inputs) is the truth: when
a trial ends, the driver `sync`s its child run against that record, logging whatever the live path lost
(server down, worker killed), and only then marks the run terminated. Unsynced runs stay flagged in the
state store and are synced on the next pass, so nothing of the record is lost while MLflow is unreachable;
system metrics, sampled live and not part of the record, pause with the server.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ablations.vocabulary import HISTORY_METRICS
from workers.sinks import MetricsSink

from .state import ablate_home

if TYPE_CHECKING:
    from .parent_view import ParentView

# Fail fast inside MLflow's client and let our buffers and retries carry an outage instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# MLflow's client prints two links to standard output per run it terminates on a server: thousands of lines.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

PARAM_LIMIT = 6000
ARTIFACT_CAP_BYTES = int(float(os.environ.get("ABLATE_ARTIFACT_CAP_MB", "64")) * 2**20)
# The UI opens a `custom_model_development` experiment on its runs (MLflow 3 opens untagged ones in GenAI mode).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SYSTEM_METRICS_EVERY_S = 10.0  # MLflow's default sampling interval
SOURCE = {"mlflow.source.type": "JOB", "mlflow.source.name": "ablate"}  # what a child run's overview names as source


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ablate_home() / 'mlflow.db'}"


def ui_url(base: str, experiment_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's runs. MLflow 3's UI shows every experiment in its GenAI mode unless
    the address or the user's last choice says otherwise (the experiment's kind tag alone does not)."""
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else base


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {ui_url(uri.rstrip('/'), experiment_id)} in a browser"
    return f"mlflow ui --backend-store-uri {uri}   # then open {ui_url('http://127.0.0.1:5000', experiment_id)}"


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


def duration(seconds: float | None) -> str:
    """A remaining time for people: "–" when unknown, "42s", "3m 05s", "2h 10m"."""
    if seconds is None:
        return "–"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _now_ms() -> int:
    return int(time.time() * 1000)


@functools.cache
def code_version() -> dict[str, str]:
    """Tags naming the code trials run: the git commit of Ablate's source tree when it is a checkout
    (`-dirty` with uncommitted changes to tracked files), else the installed package's version."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version
        return {"ablate.code_version": version("ablate")}
    return {"mlflow.source.git.commit": commit, "ablate.code_version": commit + ("-dirty" if dirty else "")}


@functools.lru_cache(maxsize=8)
def _dataset_inputs(dataset: str, data_dir: str | None, subset: int | None, validation: float) -> tuple[dict, ...]:
    import hashlib

    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource

    from workers.data import dataset_folder, load_dataset
    data = load_dataset(dataset, data_dir, subset, validation)
    folder = dataset_folder(dataset, data_dir)
    source = folder.as_uri() if folder else CodeDatasetSource({"generator": "workers.data (fixed seed)"})
    name = dataset + (f"[:{subset}]" if subset else "")
    splits = [("train", data.train), ("validation", data.val) if data.val is not None else ("test", data.test)]
    out = []
    for context, split in splits:
        x, y = split.x.numpy(), split.y.numpy()
        digest = hashlib.sha256(x.data)  # the arrays' own buffers: no copy of the dataset
        digest.update(y.data)
        with warnings.catch_warnings():
            # MLflow registers its local-file source for two URI schemes and warns that it picked one of the two.
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            found = mlflow.data.from_numpy(x, source=source, targets=y, name=name, digest=digest.hexdigest()[:16])
        out.append({**found.to_dict(), "context": context})
    return tuple(out)


def dataset_inputs(config: Any, data_dir: str | None) -> list[dict[str, str]]:
    """A trial's training and evaluation splits as MLflow dataset inputs (JSON-ready): the dataset's name with
    its subset, a digest of exactly the examples the trial sees, the folder they are read from, shapes and
    types, and the split as context. Empty when the data cannot be read (the trial itself says why)."""
    try:
        return list(_dataset_inputs(config.dataset, data_dir, config.subset, config.validation))
    except Exception:
        return []


def _dataset_entities(inputs: list[dict[str, str]]) -> list[Any]:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    fields = ("name", "digest", "source_type", "source", "schema", "profile")
    return [DatasetInput(Dataset(**{k: i.get(k) for k in fields}), tags=[InputTag("mlflow.data.context", i["context"])])
            for i in inputs]


def _start_system_metrics(uri: str, run_id: str, every_s: float):
    """MLflow's own monitor: CPU, memory, disk, network and, with nvidia-ml-py on a GPU node, each GPU's
    utilisation and memory, as `system/...` metrics of the run every `every_s` seconds while the run is
    RUNNING. Machine-wide figures: trials sharing a node show the same ones. None if it cannot start."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:
        return None


class MlflowSink(MetricsSink):
    """Buffers metrics and logs them in batches from a daemon thread; never raises into training.

    The thread first starts the run (RUNNING, `ablate.status` running, the dataset inputs, system metrics),
    then ships metrics with the trial's progress: tags `ablate.iteration` ("400/1000") and `ablate.eta`
    (remaining time at the pace since training began, as `begin` said where and for how long).
    Without `run_id`, it first finds the run by `find` = (experiment name, trial key): the SCHEDULED child
    run the driver makes for the trial, so a trial never waits for the driver to make its run.
    """

    def __init__(self, uri: str, run_id: str | None, flush_every: float = 2.0, close_timeout: float = 10.0,
                 inputs: list[dict[str, str]] = (), system_metrics_s: float = SYSTEM_METRICS_EVERY_S,
                 find: tuple[str, str] | None = None):
        self.uri, self.run_id, self.flush_every, self.close_timeout = uri, run_id, flush_every, close_timeout
        self.find, self.inputs, self.system_metrics_s = find, list(inputs), system_metrics_s
        self._buffer: list[Any] = []
        self._progress: dict[str, str] = {}  # tags not shipped yet
        self._origin: tuple[int, float, int] | None = None  # (step training began at, when, of how many)
        self.steps: set[int] = set()  # every step logged through this sink
        self._started = False
        self._monitor = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="mlflow-sink", daemon=True)
        self._thread.start()

    def begin(self, start: int, iterations: int) -> None:
        with self._lock:
            self._origin = (start, time.time(), iterations)
            self._progress = {"ablate.iteration": f"{start}/{iterations}", "ablate.eta": duration(None)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = time.time()
        with self._lock:
            self._buffer += [Metric(k, float(v), int(now * 1000), step) for k, v in metrics.items() if v is not None]
            self.steps.add(step)
            if self._origin is not None:
                start, since, iterations = self._origin
                eta = (iterations - step) * (now - since) / (step - start) if step > start else None
                self._progress = {"ablate.iteration": f"{step}/{iterations}", "ablate.eta": duration(eta)}

    def _start(self) -> bool:
        if self._started:
            return True
        from mlflow.entities import RunTag
        try:
            client = _client(self.uri)
            if self.run_id is None:
                self.run_id = self._found(client)
                if self.run_id is None:
                    return False
            client.update_run(self.run_id, status="RUNNING")
            client.log_batch(self.run_id, tags=[RunTag("ablate.status", "running")])
            if self.inputs:
                client.log_inputs(self.run_id, datasets=_dataset_entities(self.inputs))
        except Exception:
            return False
        self._started = True
        self._monitor = _start_system_metrics(self.uri, self.run_id, self.system_metrics_s)
        return True

    def _found(self, client: Any) -> str | None:
        if self.find is None:
            return None
        experiment = client.get_experiment_by_name(self.find[0])
        runs = [] if experiment is None else client.search_runs(
            [experiment.experiment_id], f"tags.`ablate.trial` = '{self.find[1]}' and attributes.status = 'SCHEDULED'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def _flush(self) -> bool:
        from mlflow.entities import RunTag
        if not self._start():
            return False
        with self._lock:
            batch, self._buffer = self._buffer[:1000], self._buffer[1000:]
            progress, self._progress = self._progress, {}
        if not batch and not progress:
            return True
        try:
            _client(self.uri).log_batch(self.run_id, metrics=batch, tags=[RunTag(k, v) for k, v in progress.items()])
            return True
        except Exception:
            with self._lock:
                self._buffer = batch + self._buffer  # keep order; try again later
                self._progress = self._progress or progress
            return False

    def _loop(self) -> None:
        while not self._stop:
            self._flush()
            self._wake.wait(self.flush_every)
            self._wake.clear()

    def delivered(self, result: dict[str, Any]) -> bool:
        """After `close`: this sink started the run, logged every step of the trial's record and all of it
        reached the server (not so for a resumed trial, whose earlier steps another attempt logged, or failed to)."""
        steps = {h["step"] for h in result.get("history", [])}
        if result.get("diverged_at") is not None:
            steps.add(result["diverged_at"])
        return self._stop and self._started and not self._buffer and steps <= self.steps

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        deadline = time.time() + self.close_timeout
        while (self._buffer or self._progress) and time.time() < deadline:
            if not self._flush():
                break  # server unreachable: don't hold the slot; the driver's sync logs the rest
        # Whatever is still buffered is in the trial's result history; the driver's sync logs it.
        if self._monitor is not None:
            # Its last samples, without holding the slot past the timeout when the server is gone.
            stopper = threading.Thread(target=self._monitor.finish, daemon=True)
            stopper.start()
            stopper.join(timeout=max(0.0, deadline - time.time()))


def live_sink(task: dict[str, Any], inputs: list[dict]) -> MlflowSink | None:
    """The sink that starts a trial task's child run and streams to it: the task's run, or the one the
    driver makes for it meanwhile (found by trial key); none for a task without MLflow."""
    if not task.get("tracking_uri"):
        return None
    return MlflowSink(task["tracking_uri"], task.get("run_id"), inputs=inputs,
                      system_metrics_s=task.get("system_metrics_s", SYSTEM_METRICS_EVERY_S),
                      find=(task["experiment"], task["key"]) if task.get("key") else None)


class Tracker:
    """Driver-side MLflow bookkeeping. Every call may raise when the server is unreachable; callers treat
    that as 'try again later' (see `sync`)."""

    def __init__(self, uri: str | None = None):
        self.uri = uri or default_tracking_uri()
        self._experiments: dict[str, str] = {}
        self._client = None
        # Where the runs this tracker made keep their artifacts: logging one then needs no read of the run.
        self._artifact_uris: dict[str, str] = {}

    @property
    def client(self):
        """One client for the tracker's life (thread-safe: each request is its own); making one per call cost
        the driver more CPU than the call itself."""
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    @property
    def ui_base(self) -> str | None:
        """The UI's address when the tracking URI is a server (it serves the UI too), for links."""
        return self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else None

    def known_experiment(self, name: str) -> str | None:
        """The id of an experiment this tracker has used (no call to MLflow)."""
        return self._experiments.get(name)

    def experiment(self, name: str) -> str:
        if name not in self._experiments:
            client = self.client
            exp = client.get_experiment_by_name(name)
            if exp is None:
                location = None
                if self.uri.startswith("sqlite:"):
                    location = (ablate_home() / "mlartifacts").as_uri()
                exp_id = client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
            else:
                exp_id = exp.experiment_id
                if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older Ablate; a kind a user chose stays
                    client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
            self._experiments[name] = exp_id
        return self._experiments[name]

    # ------------------------------------------------------------------------------------- parent run
    def start_grid(self, name: str, grid_id: str) -> str:
        """The parent run of grid name `name` (the grid's own content comes with `update_grid`)."""
        run = self.client.create_run(self.experiment(name), run_name=name,
                                     tags={"ablate.grid": grid_id, "ablate.grids": grid_id, "ablate.state": "running"})
        return run.info.run_id

    def reopen_grid(self, run_id: str) -> dict[str, str]:
        """A grid of the parent's name runs (again, grown or resumed): the parent is running. Returns its tags
        from before."""
        from mlflow.entities import RunTag
        client = self.client
        before = client.get_run(run_id).data.tags
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag("ablate.state", "running")])
        return before

    def update_grid(self, run_id: str, view: ParentView) -> None:
        """Log what the parent shows now: metrics at the view's step, tags, tables and files (replaced)."""
        from mlflow.entities import Metric, RunTag
        client, now = self.client, _now_ms()
        metrics = [Metric(k, v, now, view.step) for k, v in view.metrics.items()]
        tags = [RunTag(k, v) for k, v in view.tags.items()]
        if view.tables:
            # What MLflow's own log_table records, so the UI shows these JSON files as tables. log_table itself
            # appends to an existing file; a refreshed comparison replaces it.
            tables = [{"path": path, "type": "table"} for path in view.tables]
            tags.append(RunTag("mlflow.loggedArtifacts", json.dumps(tables)))
        _log_batches(client, run_id, metrics=metrics, tags=tags)
        if view.tables or view.files:
            with tempfile.TemporaryDirectory() as folder:
                for name, content in view.tables.items():
                    Path(folder, name).write_text(json.dumps(content, allow_nan=False))
                for name, text in view.files.items():
                    Path(folder, name).write_text(text, encoding="utf-8")
                client.log_artifacts(run_id, folder)

    def end_grid(self, run_id: str, counts: dict[str, int]) -> None:
        self.client.set_terminated(run_id, "FINISHED" if counts.get("error", 0) == 0 else "FAILED")

    def tag_run(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, tags=items[i:i + 100])

    # ------------------------------------------------------------------------------------- child runs
    def start_trial(self, name: str, grid_id: str, parent_run_id: str, trial: dict[str, Any],
                    config: dict[str, Any]) -> str:
        """A trial's child run, SCHEDULED until its worker starts it."""
        from mlflow.entities import Param
        client = self.client
        run_id = self.create_trial_run(name, grid_id, parent_run_id, trial, config)
        client.update_run(run_id, status="SCHEDULED")
        _log_batches(client, run_id, params=[Param(k, v) for k, v in flatten("", config).items()])
        return run_id

    def create_trial_run(self, name: str, grid_id: str, parent_run_id: str, trial: dict[str, Any],
                         config: dict[str, Any], status: str = "queued") -> str:
        """A trial's child run with its tags, nothing else (one request): `start_trial` readies it for its worker;
        for a trial that ended before it had a run (MLflow fell behind the cluster), `sync(config=...)` then
        logs the whole record at once."""
        model = config["model"]
        tags = {"mlflow.parentRunId": parent_run_id, "ablate.grid": grid_id, "ablate.trial": trial["key"],
                "ablate.variant": trial["variant"], "ablate.unit": model["unit"], "ablate.shortcut": model["shortcut"],
                "ablate.depth": str(trial["depth"]), "ablate.dataset": trial["dataset"],
                "ablate.seed": str(trial["seed"]), "ablate.status": status, **SOURCE, **code_version()}
        run_name = f"{trial['variant']}-d{trial['depth']}-s{trial['seed']}"
        info = self.client.create_run(self.experiment(name), run_name=run_name, tags=tags).info
        self._artifact_uris[info.run_id] = info.artifact_uri
        return info.run_id

    def schedule(self, run_id: str) -> None:
        """An existing child run whose trial is queued again (a retry, a resumed grid)."""
        from mlflow.entities import RunTag
        self.client.update_run(run_id, status="SCHEDULED")
        self.client.log_batch(run_id, tags=[RunTag("ablate.status", "queued")])

    def discard(self, run_id: str) -> None:
        """A child run made for a trial that another driver's run already holds."""
        self.client.delete_run(run_id)
        self._artifact_uris.pop(run_id, None)

    def child_runs(self, name: str, parent_run_id: str) -> dict[str, list[str]]:
        """{trial key: its run ids} of the parent's child runs (one search, paged). A trial has more than one
        when a driver died with a request to make its run still queued at the server."""
        found: dict[str, list[str]] = {}
        token = None
        while True:
            page = self.client.search_runs([self.experiment(name)], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                           max_results=1000, page_token=token)
            for r in page:
                if "ablate.trial" in r.data.tags:
                    found.setdefault(r.data.tags["ablate.trial"], []).append(r.info.run_id)
            token = page.token
            if not token:
                return found

    def sync(self, run_id: str, result: dict[str, Any], status: str, checkpoint_dir: str | None = None,
             delivered: bool = False, iterations: int | None = None, config: dict[str, Any] | None = None) -> None:
        """Make the child run hold every metric and dataset input of the trial's own record, then terminate it.

        `delivered`: the trial's live sink logged its whole history and inputs to this run, so nothing is read back.
        `iterations`: the recipe's total, for the run's last `ablate.iteration`.
        `config`: the run was just made by `create_trial_run` and holds nothing yet: nothing is read back, and
        the configuration's params go in the same requests as the metrics and tags.
        """
        from mlflow.entities import Metric, Param, RunTag
        client = self.client
        fresh = config is not None
        missing = []
        history = [] if delivered else result.get("history") or []
        for key in [m for m in HISTORY_METRICS if any(m in h for h in history)]:  # one read per metric it holds
            have = set() if fresh else {m.step for m in client.get_metric_history(run_id, key)}
            missing += [Metric(key, float(h[key]), _now_ms(), int(h["step"]))
                        for h in history if h.get(key) is not None and h["step"] not in have]
        if not delivered and result.get("status") == "diverged" and result.get("diverged_at") is not None:
            have = set() if fresh else {m.step for m in client.get_metric_history(run_id, "test_error")}
            if result["diverged_at"] not in have:
                missing.append(Metric("test_error", float(result["test_error"]), _now_ms(),
                                      int(result["diverged_at"])))
        tags = [RunTag("ablate.status", status), RunTag("ablate.eta", "0s")]
        if iterations and result.get("iterations") is not None:
            tags.append(RunTag("ablate.iteration", f"{result['iterations']}/{iterations}"))
        params = [Param(k, v) for k, v in flatten("", config).items()] if fresh else []
        _log_batches(client, run_id, metrics=missing, params=params, tags=tags)
        if not delivered and result.get("inputs"):
            client.log_inputs(run_id, datasets=_dataset_entities(result["inputs"]))  # MLflow keeps one of each
        if checkpoint_dir:
            self._artifacts(run_id, checkpoint_dir)
        client.set_terminated(run_id, "FAILED" if status == "error" else "FINISHED")

    def _artifacts(self, run_id: str, checkpoint_dir: str) -> None:
        """The resolved config and result, and the final checkpoint while under the size cap."""
        from workers.checkpoint import checkpoints
        folder = Path(checkpoint_dir)
        result_file = folder / "result.json"
        found = checkpoints(folder)
        files = ([(result_file, None)] if result_file.exists() else []) + (
            [(found[0], "checkpoint")] if found and found[0].stat().st_size <= ARTIFACT_CAP_BYTES else [])
        uri = self._artifact_uris.pop(run_id, None)  # the run's last use of it (kept, 10,000 runs' worth piled up)
        if not files:
            return
        if uri is not None:  # made here: its artifact location is known without asking the server
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
            repo = get_artifact_repository(uri, tracking_uri=self.uri)
            for path, folder_in_run in files:
                repo.log_artifact(str(path), folder_in_run)
        else:
            for path, folder_in_run in files:
                self.client.log_artifact(run_id, str(path), artifact_path=folder_in_run)


def _log_batches(client: Any, run_id: str, metrics: list[Any] = (), params: list[Any] = (),
                 tags: list[Any] = ()) -> None:
    """Log metrics, params and tags in as few requests as MLflow's limits allow (per request: 1000 metrics,
    100 params, 100 tags, 1000 in all)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        p, t = params[:100], tags[:100]
        m = metrics[:1000 - len(p) - len(t)]
        client.log_batch(run_id, metrics=m, params=p, tags=t)
        metrics, params, tags = metrics[len(m):], params[len(p):], tags[len(t):]
