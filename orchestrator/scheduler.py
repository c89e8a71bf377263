"""Run a grid to completion on Ray core tasks: claim, submit, wait, record, retry, sync to MLflow.

Not Ray Tune: measured here, Tune spent about 2.4 s per trial (efficiency 0.10 on 0.5 s trials) where
plain tasks reached 0.99, and Tune cannot add seeds to a finished experiment. One Ray task per trial,
each asking for the grid's resources (fractional GPUs let small trials share one); the driver keeps
about two tasks per free slot in flight so a slot never waits on the driver.

Crash safety comes from the state store: a trial runs only after an atomic claim, its checkpoints live
under a path every node can read (`ABLATE_CHECKPOINT_DIR`, default $ABLATE_HOME/checkpoints), and a
trial whose driver died is taken over once its heartbeat is stale and resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ablations.vocabulary import ACTIVE, ENDED, MEASURED
from workers.sinks import NullSink

from .cluster import ensure_ray
from .grids import GridError, GridSpec, GridTrial, expand_grid
from .state import STALE_AFTER_S, StateStore, ablate_home
from .tracking import MlflowSink, Tracker

HEARTBEAT_EVERY_S = STALE_AFTER_S / 4
CANCEL_CHECK_S = 1.0  # how often the loop asks the store whether the grid was cancelled
QUEUE_SLACK_S = 600.0
POLL_S = 0.2
RUN_WAIT_S = 2.0  # how long a submission waits for its MLflow child run before going without live metrics
LIVE_KEY = "_mlflow_live_run"  # set by a trial whose sink delivered every metric; never stored


def checkpoint_root() -> Path:
    return Path(os.environ.get("ABLATE_CHECKPOINT_DIR") or ablate_home() / "checkpoints").resolve()


def execute_trial(task: dict[str, Any]) -> dict[str, Any]:
    """The Ray task body: one trial, metrics streamed to its MLflow child run when there is one."""
    return execute_group([task])[0]


def execute_group(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Ray task body: the seeds of one cell (one, or a `fuse_seeds` group) trained by the one loop
    (workers/trainer.py); checkpoints, results and MLflow runs stay per seed."""
    from workers.trainer import TrialConfig, run_trials
    sinks = [MlflowSink(t["tracking_uri"], t["run_id"]) if t.get("run_id") else None for t in tasks]
    first = tasks[0]
    results = run_trials([TrialConfig.model_validate_json(t["config"]) for t in tasks],
                         checkpoint_dirs=[t["checkpoint_dir"] for t in tasks],
                         sinks=[s or NullSink() for s in sinks], threads=first["threads"], device=first["device"],
                         data_dir=first.get("data_dir"), time_limit_s=first.get("timeout_s"))
    for task, sink, result in zip(tasks, sinks, results):
        if sink is not None and sink.delivered(result):
            # The live run already holds the whole history: the driver's sync need not read it back.
            result[LIVE_KEY] = task["run_id"]
    return results


class GridRunner:
    """Drives one grid. `trial_fn(task) -> result` runs inside Ray workers (default: `execute_trial`)."""

    def __init__(self, store: StateStore | None = None, tracker: Tracker | None = None,
                 trial_fn: Callable[[dict], dict] = execute_trial, progress: bool = True,
                 data_dir: str | None = None, share: Callable[[], int] = lambda: 1,
                 group_fn: Callable[[list[dict]], list[dict]] = execute_group):
        self.store = store or StateStore()
        self.tracker = tracker or Tracker()
        self.trial_fn, self.group_fn = trial_fn, group_fn
        self.progress = progress
        self.data_dir = data_dir
        self.share = share  # how many grids share the cluster now: each gets that fraction of the slots
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Syncing ended trials to MLflow happens off the scheduling loop, one call at a time.
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-sync")
        self._parent_lock = threading.Lock()
        self._prepared: dict[str, Future] = {}
        self._orphans: dict[str, str] = {}  # trial key → a child run a killed driver created but never saved

    # ------------------------------------------------------------------------------------------ mlflow
    def _parent_run(self, spec: GridSpec, grid_id: str) -> str | None:
        with self._parent_lock:
            return self._parent_run_locked(spec, grid_id)

    def _parent_run_locked(self, spec: GridSpec, grid_id: str) -> str | None:
        row = self.store.grid(grid_id)
        if row.mlflow_run_id:
            return row.mlflow_run_id
        try:
            run_id = self.tracker.start_grid(spec.name, grid_id, spec.model_dump(mode="json", by_alias=True))
        except Exception as exc:
            print(f"ablate: MLflow unreachable ({_first_line(exc)}); runs will be logged later", file=sys.stderr)
            return None
        self.store.set_grid_run(grid_id, run_id)
        return run_id

    def _child_run(self, spec: GridSpec, grid_id: str, trial: dict[str, Any]) -> str | None:
        if trial.get("mlflow_run_id"):
            return trial["mlflow_run_id"]
        parent = self._parent_run(spec, grid_id)
        if parent is None:
            return None
        try:
            # A driver killed between creating a run and saving its id left it behind: adopt it.
            run_id = self._orphans.pop(trial["key"], None) or self.tracker.start_trial(
                spec.name, grid_id, parent, trial, json.loads(trial["config"]))
        except Exception:
            return None
        self.store.set_trial_run(grid_id, trial["key"], run_id=run_id)
        trial["mlflow_run_id"] = run_id
        return run_id

    def _prepare_run(self, spec: GridSpec, grid_id: str, key: str) -> Future:
        """Create a trial's child run on the MLflow thread ahead of its submission (idempotent)."""
        if key not in self._prepared:
            def create() -> str | None:
                trials = self.store.grid_trials(grid_id, {key})
                return self._child_run(spec, grid_id, trials[0]) if trials else None
            self._prepared[key] = self._syncer.submit(create)
        return self._prepared[key]

    def sync_mlflow(self, spec: GridSpec, grid_id: str, keys: set[str] | None = None,
                    live: dict[str, str] | None = None) -> int:
        """Bring ended trials' child runs up to their records; returns how many remain unsynced.

        `live` maps trial keys to the run their worker's sink fully delivered to: those skip reading back.
        """
        pending = 0
        for trial in self.store.grid_trials(grid_id, keys):
            if trial["mlflow_synced"] or trial["status"] not in ENDED:
                continue
            run_id = self._child_run(spec, grid_id, trial)
            try:
                if run_id is None:
                    raise ConnectionError("no run")
                result = trial["result"] or {"history": []}
                self.tracker.sync(run_id, result, trial["status"], str(checkpoint_root() / trial["key"]),
                                  delivered=(live or {}).get(trial["key"]) == run_id)
                self.store.set_trial_run(grid_id, trial["key"], synced=True)
            except Exception:
                pending += 1
        return pending

    # -------------------------------------------------------------------------------------------- run
    def submit(self, spec: GridSpec, extra: list[GridTrial] = ()) -> str:
        """Validate, expand and record the grid (no training yet); returns its id. Idempotent."""
        tuned = self.store.tuned_recipes() if spec.tuned_names() else {}
        trials = expand_grid(spec, tuned=tuned)
        _reject_duplicates(trials)
        known = {t.key for t in trials}
        trials += [t for t in {t.key: t for t in extra}.values() if t.key not in known]
        grid_id = spec.grid_id(tuned)
        self.store.register_grid(grid_id, spec.name, spec.model_dump(mode="json", by_alias=True), trials)
        return grid_id

    def run(self, spec: GridSpec, sync_timeout_s: float = 60.0, extra: list[GridTrial] = ()) -> dict[str, Any]:
        """Run the grid, plus `extra` trials added to it (more seeds for some cells), to completion."""
        grid_id = self.submit(spec, extra)
        rows = {t["key"]: t for t in self.store.grid_trials(grid_id)}
        reused = sum(1 for t in rows.values() if t["status"] in MEASURED)
        self._open_mlflow(spec, grid_id, rows)
        ensure_ray()
        grid = _GridPass(self, spec, grid_id, rows)
        beat, cancel_check = _Every(HEARTBEAT_EVERY_S), _Every(CANCEL_CHECK_S)
        display = _Progress(len(rows), reused, enabled=self.progress, counts=lambda: self.store.counts(grid_id))
        interrupted = False
        try:
            while grid.busy():
                grid.submit_more()
                for ref in grid.ended():
                    grid.record(ref)
                now = time.time()
                grid.expire_overdue(now)
                if beat.due(now):
                    grid.heartbeat()
                if cancel_check.due(now):
                    grid.stop_if_cancelled()
                display.tick(now)
        except KeyboardInterrupt:
            interrupted = True
            grid.hand_back("queued")
        finally:
            display.close()

        counts = self.store.counts(grid_id)
        unsynced, parent = self._close_mlflow(spec, grid_id, counts, 0 if interrupted else sync_timeout_s,
                                              end=not interrupted)
        if interrupted:
            raise GridInterrupted(grid_id)
        return {"grid": grid_id, "name": spec.name, "trials": len(rows), "executed": grid.executed,
                "reused": reused, "cancelled": grid.cancelled, "counts": counts, "mlflow_unsynced": unsynced,
                "tracking_uri": self.tracker.uri, "mlflow_run_id": parent}

    def _open_mlflow(self, spec: GridSpec, grid_id: str, rows: dict[str, dict[str, Any]]) -> None:
        """Start of a run: the parent run made as the MLflow thread's first job, or, when it exists, child
        runs a killed driver created but never saved found for adoption."""
        parent = self.store.grid(grid_id).mlflow_run_id
        self._orphans = {}
        self._prepared.clear()
        if parent is None:
            self._syncer.submit(self._parent_run, spec, grid_id)
        elif any(not t["mlflow_run_id"] for t in rows.values()):
            try:
                known = {t["mlflow_run_id"] for t in rows.values()}
                self._orphans = {k: r for k, r in self.tracker.child_runs(spec.name, parent).items() if r not in known}
            except Exception:
                pass  # MLflow unreachable: nothing to adopt now

    def _close_mlflow(self, spec: GridSpec, grid_id: str, counts: dict[str, int], sync_timeout_s: float,
                      end: bool) -> tuple[int, str | None]:
        """End of a run: ended trials synced, trying again for up to `sync_timeout_s`, then, when `end` and
        every run is synced, the parent run ended. Returns how many runs stay unsynced, and the parent run."""
        self._syncer.submit(lambda: None).result()  # drain the per-trial syncs queued so far
        deadline = time.time() + sync_timeout_s
        unsynced = self.sync_mlflow(spec, grid_id)
        while unsynced and time.time() < deadline:
            time.sleep(2.0)
            unsynced = self.sync_mlflow(spec, grid_id)
        parent = self.store.grid(grid_id).mlflow_run_id
        if parent and end and not unsynced:
            try:
                self.tracker.end_grid(parent, counts)
            except Exception:
                unsynced += 1
        return unsynced, parent


class _GridPass:
    """One run of a grid by a GridRunner: the trials left to do, the Ray tasks in flight, and the steps
    of the scheduling loop that move trials between them (claim and submit, record, time out, heartbeat,
    cancel, hand back)."""

    def __init__(self, runner: GridRunner, spec: GridSpec, grid_id: str, rows: dict[str, dict[str, Any]]):
        import ray
        self.runner, self.store, self.owner = runner, runner.store, runner.owner
        self.spec, self.grid_id, self.rows = spec, grid_id, rows
        self.todo = [k for k, t in rows.items() if t["status"] not in MEASURED]
        self.inflight: dict[Any, tuple[list[str], float]] = {}  # one Ray task: its trials (a fused group), when
        # Trials this runner claimed (or is claiming) and has not recorded: what an interrupt hands back.
        self.held: set[str] = set()
        self.waiting_on_others: set[str] = set()  # trials another owner held when this runner came to them
        self.executed = self.cancelled = 0

        cpu, gpu = spec.resources.cpu, spec.resources.gpu
        options = dict(num_cpus=cpu, num_gpus=gpu, max_retries=spec.max_retries, retry_exceptions=False)
        self.remote = ray.remote(runner.trial_fn).options(**options)
        self.remote_group = ray.remote(runner.group_fn).options(**options) if spec.fuse_seeds > 1 else None
        total = ray.cluster_resources()
        self.slots = max(1, int(min(total.get("CPU", 1) / cpu, total.get("GPU", 0) / gpu if gpu else float("inf"))))
        self.task_fields = {"threads": max(1, int(cpu)), "device": "cuda" if gpu > 0 else "cpu",
                            "data_dir": spec.data_dir or runner.data_dir, "tracking_uri": runner.tracker.uri,
                            "timeout_s": spec.timeout_s}
        # Each attempt enforces its own time limit; this backstop only catches a task that never reports
        # back (queueing and Ray's retries after node loss are allowed for).
        self.backstop_s = spec.timeout_s * (spec.max_retries + 1) + QUEUE_SLACK_S if spec.timeout_s else None

    def busy(self) -> bool:
        return bool(self.todo or self.inflight or self.waiting_on_others)

    def submit_more(self) -> None:
        """Claim and submit trials until about two tasks per slot of this grid's share are in flight."""
        depth = max(1, 2 * self.slots // max(1, self.runner.share()))
        # MLflow child runs are made on the MLflow thread a few trials ahead: the loop only submits.
        for key in self.todo[:2 * depth]:
            self.runner._prepare_run(self.spec, self.grid_id, key)
        while self.todo and len(self.inflight) < depth:
            claimed = self._claim(_next_group(self.todo, self.rows, self.spec.fuse_seeds))
            if claimed:
                tasks = [self._task(key) for key in claimed]
                ref = self.remote.remote(tasks[0]) if len(tasks) == 1 else self.remote_group.remote(tasks)
                self.inflight[ref] = (claimed, time.time())

    def _claim(self, group: list[str]) -> list[str]:
        """The trials of `group` this runner now holds; someone else runs the others (or they ended)."""
        claimed = []
        for key in group:
            self.held.add(key)  # before the claim commits: an interrupt right after it still hands it back
            if self.store.claim(key, self.owner):
                claimed.append(key)
            else:
                self.held.discard(key)
                self.waiting_on_others.add(key)
        return claimed

    def _task(self, key: str) -> dict[str, Any]:
        """What a Ray task needs to train one trial, its MLflow child run included when ready in time."""
        try:
            run_id = self.runner._prepare_run(self.spec, self.grid_id, key).result(timeout=RUN_WAIT_S)
        except Exception:
            run_id = None  # MLflow slow or down: the sync logs this trial's metrics at its end
        return {"config": self.rows[key]["config"], "checkpoint_dir": str(checkpoint_root() / key),
                **self.task_fields, "run_id": run_id}

    def ended(self) -> list[Any]:
        """Tasks that ended: wake on the first to end (or after POLL_S), then take every other one ready by then."""
        import ray
        if not self.inflight:
            time.sleep(POLL_S)
            return []
        refs = list(self.inflight)
        ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_S)
        if ready and len(refs) > 1:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    def record(self, ref: Any) -> None:
        """Store what one ended task (a trial, or a fused group of trials) returned, then sync it to MLflow."""
        import ray
        from ray.exceptions import RayTaskError, TaskCancelledError
        keys = self.inflight[ref][0]
        try:
            answer = ray.get(ref)
        except TaskCancelledError:
            answer = None
        except Exception as exc:
            # The trial raised (RayTaskError): retry it, resuming its checkpoint, up to max_retries times.
            # Anything else means Ray already spent its own max_retries on lost workers or nodes: final.
            self._failed(keys, _first_line(exc, 2000), self.spec.max_retries if isinstance(exc, RayTaskError) else 0)
            answer = None
        if answer is not None:
            live = {}
            for key, result in zip(keys, answer if isinstance(answer, list) else [answer]):
                if run := result.pop(LIVE_KEY, None):
                    live[key] = run
                self.executed += int(self.store.finish(key, self.owner, result))
            self.runner._syncer.submit(self.runner.sync_mlflow, self.spec, self.grid_id, set(keys), live)
        self._forget(ref)

    def _failed(self, keys: list[str], error: str, retries: int) -> None:
        """A failed attempt: queued again while retries remain (back on `todo`), else an error to sync."""
        for key in keys:
            if self.store.fail(key, self.owner, error, retries) == "queued":
                self.todo.append(key)
            else:
                self.runner._syncer.submit(self.runner.sync_mlflow, self.spec, self.grid_id, {key})

    def _forget(self, ref: Any) -> None:
        """The task is done with: its trials are this runner's no more (only after they were recorded, so an
        interrupt while recording still hands them back)."""
        keys, _ = self.inflight.pop(ref)
        self.held.difference_update(keys)

    def expire_overdue(self, now: float) -> None:
        """Fail the tasks that outlived the backstop (each trial's own time limit, retries and queueing)."""
        if self.backstop_s is None:
            return
        import ray
        for ref, (keys, submitted) in list(self.inflight.items()):
            if now - submitted > self.backstop_s:
                ray.cancel(ref, force=True)
                self._failed(keys, f"no answer after {self.backstop_s:g} s", self.spec.max_retries)
                self._forget(ref)

    def heartbeat(self) -> None:
        """Keep this runner's trials; trials another owner held go back on `todo` unless they ended (their
        owner queued them again, or went silent and the claim takes them over)."""
        self.store.heartbeat(self.owner, self.held)
        for key in list(self.waiting_on_others):
            self.waiting_on_others.discard(key)
            if self.store.trial(key).status in ACTIVE:
                self.todo.append(key)

    def stop_if_cancelled(self) -> None:
        if self.store.is_cancelled(self.grid_id):
            self.cancelled = len(self.held)
            self.hand_back("cancelled")
            self.todo.clear()
            self.waiting_on_others.clear()

    def hand_back(self, status: str) -> None:
        """Stop every task in flight and hand every trial this runner holds back to the store as `status`."""
        import ray
        for ref in self.inflight:
            ray.cancel(ref, force=True)
        self.store.release(self.owner, self.held, status=status)
        self.inflight.clear()
        self.held.clear()


class _Every:
    """Due at most once per `period` seconds, the first time a period after its creation."""

    def __init__(self, period: float):
        self.period, self.last = period, time.time()

    def due(self, now: float) -> bool:
        if now - self.last <= self.period:
            return False
        self.last = now
        return True


class GridInterrupted(Exception):
    """Ctrl-C: running trials were handed back as queued; the same command resumes the grid."""


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:limit]


def _next_group(todo: list[str], rows: dict[str, dict[str, Any]], size: int) -> list[str]:
    """Take the next trial from `todo` and, up to `size` in all, later ones that differ from it only in seed."""
    first = todo.pop(0)
    if size <= 1:
        return [first]

    def cell(key: str) -> str:
        config = json.loads(rows[key]["config"])
        config.pop("seed")
        return json.dumps(config, sort_keys=True)

    mine, group = cell(first), [first]
    for key in list(todo):
        if len(group) == size:
            break
        if cell(key) == mine:
            todo.remove(key)
            group.append(key)
    return group


def _reject_duplicates(trials: list[GridTrial]) -> None:
    seen: dict[str, GridTrial] = {}
    for t in trials:
        other = seen.setdefault(t.key, t)
        if other is not t:
            raise GridError(f"variants {other.variant!r} and {t.variant!r} are the same network "
                            f"(identical configuration at depth {t.depth}): drop one")


class _Progress:
    """done/running/queued and an ETA on standard error (rich); silent, and never reading counts, when disabled."""

    def __init__(self, total: int, done: int, enabled: bool, counts: Callable[[], dict[str, int]]):
        self.enabled, self.total, self.counts = enabled, total, counts
        self.drawn = 0.0
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            self.bar = Progress(TextColumn("[bold]trials"), BarColumn(), TextColumn("{task.description}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=False)
            self.task = self.bar.add_task("", total=total, completed=done)
            self.bar.start()

    def tick(self, now: float) -> None:
        """Redraw, at most 4 times a second."""
        if self.enabled and now - self.drawn >= 0.25:
            self.drawn = now
            self._draw()

    def _draw(self) -> None:
        counts = self.counts()
        done = counts["finished"] + counts["diverged"]
        text = (f"{done}/{self.total} done · {counts['running']} running · {counts['queued']} queued"
                + (f" · {counts['error']} error" if counts["error"] else ""))
        self.bar.update(self.task, completed=done + counts["error"] + counts["cancelled"], description=text)

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.bar.stop()
