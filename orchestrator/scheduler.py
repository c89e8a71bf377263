"""Run a grid to completion on Ray core tasks: claim, submit, wait, record, retry, sync to MLflow.

Not Ray Tune: measured here, Tune spent about 2.4 s per trial (efficiency 0.10 on 0.5 s trials) where
plain tasks reached 0.99, and Tune cannot add seeds to a finished experiment. One Ray task per trial,
each asking for the grid's resources (fractional GPUs let small trials share one); the driver keeps
about two tasks per free slot in flight so a slot never waits on the driver. A trial on several workers
(`resources.workers`) is a task too, one that holds nothing and runs the trial's Ray Train job
(orchestrator/distributed.py).

Crash safety comes from the state store: a trial runs only after an atomic claim, its checkpoints live
under a path every node can read (`ABLATE_CHECKPOINT_DIR`, default $ABLATE_HOME/checkpoints), and a
trial whose driver died is taken over once its heartbeat is stale and resumes from its last checkpoint.

Scale: the loop claims the trials for all its free slots at once and stores every result that arrived
together (a few statements per batch, not per trial), and never waits on MLflow: child runs are made and
synced in batches on threads of their own. A server slower than the cluster only makes MLflow lag (the
parent run's `mlflow_unsynced`); the state store's record stays the truth and the runs catch up from it.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from ablations.vocabulary import ACTIVE, ENDED, MEASURED
from workers.sinks import NullSink

from .cluster import ensure_ray
from .distributed import execute_distributed
from .grids import GridError, GridSpec, GridTrial, expand_grid
from .state import STALE_AFTER_S, StateStore, ablate_home
from .tracking import SYSTEM_METRICS_EVERY_S, Tracker, dataset_inputs, live_sink

HEARTBEAT_EVERY_S = STALE_AFTER_S / 4
CANCEL_CHECK_S = 1.0  # how often the loop asks the store whether the grid was cancelled
QUEUE_SLACK_S = 600.0
POLL_S = 0.2
LIVE_KEY = "_mlflow_live_run"  # set by a trial whose sink delivered every metric; never stored
# A new grid with more trials than this records the rest while its first ones run.
FIRST_RECORDED = 1000
PARENT_EVERY_S = 10.0  # the parent run's progress and ETA are refreshed this often while the grid runs
# ... and its comparison (table, cell metrics, report: a second or two of the driver's CPU) at most this
# often, when trials ended since; always at the end.
COMPARISON_EVERY_S = 30.0
# MLflow: the requests of this many trials' runs in flight at once (a server answers several at a time), and
# at most this many trials per pass of the MLflow thread (the parent's refreshes come between passes).
SYNC_THREADS = 4
SYNC_BATCH = 64
# The MLflow threads' niceness above the driver's own: where MLflow's client work (about 20 ms of CPU per trial,
# mostly HTTP and JSON) and the scheduling loop want the same cores, the loop and the trials win and MLflow
# lags (it catches up from the store). Linux only, where a thread has a niceness of its own; 0 turns it off.
MLFLOW_NICE = int(os.environ.get("ABLATE_MLFLOW_NICE", "10"))
_PARENT_LOCK = threading.Lock()  # one parent run per grid name among this process's runners (the service)


def checkpoint_root() -> Path:
    return Path(os.environ.get("ABLATE_CHECKPOINT_DIR") or ablate_home() / "checkpoints").resolve()


def execute_trial(task: dict[str, Any]) -> dict[str, Any]:
    """The Ray task body: one trial, streamed live to its MLflow child run when there is one."""
    return execute_group([task])[0]


def execute_group(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Ray task body: the seeds of one cell (one, or a `fuse_seeds` group) trained by the one loop
    (workers/trainer.py); checkpoints, results and MLflow runs stay per seed. The dataset inputs go into
    each result too: the record the driver syncs the run from."""
    from workers.trainer import TrialConfig, run_trials
    configs = [TrialConfig.model_validate_json(t["config"]) for t in tasks]
    first = tasks[0]
    inputs = dataset_inputs(configs[0], first.get("data_dir"))  # the seeds of a cell share their data
    sinks = [live_sink(t, inputs) for t in tasks]
    results = run_trials(configs, checkpoint_dirs=[t["checkpoint_dir"] for t in tasks],
                         sinks=[s or NullSink() for s in sinks], threads=first["threads"], device=first["device"],
                         data_dir=first.get("data_dir"), time_limit_s=first.get("timeout_s"))
    for sink, result in zip(sinks, results):
        result["inputs"] = inputs
        if sink is not None and sink.delivered(result):
            # The live run already holds the whole history: the driver's sync need not read it back.
            result[LIVE_KEY] = sink.run_id
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
        # Every MLflow call of the driver happens off the scheduling loop: jobs on this thread, one at a time
        # (each fanning a batch of trials' runs out on `_calls`). The loop only hands work over (`_want`).
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-sync", initializer=_yield_cpu)
        self._calls = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="mlflow-call",
                                         initializer=_yield_cpu)
        self._work_lock = threading.Lock()
        self._to_ready: dict[str, None] = {}  # trials soon submitted whose runs to ready, in order
        self._to_sync: dict[str, str | None] = {}  # ended trials to sync → the run their live sink delivered to
        self._pump: Future | None = None  # the MLflow thread's pass over that work, queued or running
        self._requested: set[str] = set()  # trials whose run was asked ready (once per attempt)
        self._runs: dict[str, str] = {}  # trial key → its child run, ready for its task
        self._submitted: set[str] = set()  # trials whose task was built (readying them later is too late)
        # Trials sample system metrics at the driver's MLflow setting, wherever their workers started.
        self.system_metrics_s = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
                                      or SYSTEM_METRICS_EVERY_S)
        self._orphans: dict[str, str] = {}  # trial key → a child run a killed driver created but never saved
        self._children: set[str] = set()  # run ids under this grid's parent run (the rest were reused)
        self._children_known = False  # `_children` read from MLflow for this run
        self._shown_state: str | None = None  # the parent's state when this run began, if it showed this grid
        self._ended_at_open: dict[str, int] = {}
        self._parent_next, self._parent_job = 0.0, None  # the next parent refresh, the last one queued
        self._compared: tuple[float, dict | None] = (float("-inf"), None)  # when, at which ended counts
        self._eta_origin = (time.time(), 0)  # this run's start and the trials ended by then

    # ------------------------------------------------------------------------------------------ mlflow
    def _parent_run(self, spec: GridSpec, grid_id: str) -> str | None:
        """The parent run of the grid's name, which every grid of that name shares; made on first need."""
        with _PARENT_LOCK:
            parent = self.store.grid_run(grid_id)
            if parent is not None:
                return parent
            try:
                parent = self.tracker.start_grid(spec.name, grid_id)
            except Exception as exc:
                print(f"ablate: MLflow unreachable ({_first_line(exc)}); runs will be logged later", file=sys.stderr)
                return None
            self.store.set_grid_run(grid_id, parent)
            return parent

    def _open_parent(self, spec: GridSpec, grid_id: str, reused: int) -> None:
        """Start of a run: this runner's MLflow bookkeeping reset, and as the first MLflow job the parent
        reopened, its child runs known and its progress shown."""
        now = time.time()
        self._orphans, self._children, self._children_known, self._shown_state = {}, set(), False, None
        self._ended_at_open = _ended(self.store.counts(grid_id))
        # The first comparison after COMPARISON_EVERY_S: the first child runs are made before it.
        self._compared, self._eta_origin, self._parent_next = (now, None), (now, reused), now + PARENT_EVERY_S

        def job() -> None:
            if self._know_children(spec, grid_id):
                self._refresh_parent(spec, grid_id)
        self._parent_job = self._syncer.submit(job)

    def _know_children(self, spec: GridSpec, grid_id: str) -> bool:
        """The parent running again and its child runs known (those a killed driver created but never saved
        are adopted, not made twice); False while MLflow is unreachable."""
        parent = self._parent_run(spec, grid_id)
        if parent is None:
            return False
        try:
            before = self.tracker.reopen_grid(parent)
            children = self.tracker.child_runs(spec.name, parent)
        except Exception:
            return False
        if before.get("ablate.grid") == grid_id:
            self._shown_state = before.get("ablate.state")
        held = {t["mlflow_run_id"] for t in self.store.grid_trials(grid_id)}
        self._children |= {run for runs in children.values() for run in runs}
        self._orphans = {key: free[0] for key, runs in children.items() if (free := [r for r in runs if r not in held])}
        self._children_known = True
        return True

    def _discard_strays(self, spec: GridSpec, grid_id: str, parent: str) -> None:
        """Delete the child runs of ended, synced trials that are not the trial's own: made by a driver that died
        with the request still queued at the server, after its successor had adopted what it found."""
        try:
            children = self.tracker.child_runs(spec.name, parent)
        except Exception:
            return  # left for the next run of the grid
        extra = {key for key, runs in children.items() if len(runs) > 1}
        strays = [run for t in (self.store.grid_trials(grid_id, extra) if extra else [])
                  if t["mlflow_synced"] and t["status"] in ENDED for run in children[t["key"]]
                  if run != t["mlflow_run_id"]]
        for run in strays:
            try:
                self.tracker.discard(run)
                self._children.discard(run)
            except Exception:
                pass  # left for the next run of the grid

    def _save_runs(self, made: dict[str, str]) -> dict[str, str]:
        """Give trials the child runs just made (or adopted) for them; returns the run each holds. A run made for
        a trial that another grid's driver gave its run meanwhile is deleted: the trial links to that one."""
        held = self.store.set_trial_runs(made)
        for key, run_id in made.items():
            if held[key] == run_id:
                self._children.add(run_id)
            else:
                try:
                    self.tracker.discard(run_id)
                except Exception:
                    pass  # left as a stray run; nothing refers to it
        return held

    def _want(self, spec: GridSpec, grid_id: str, ready: Iterable[str] = (),
              synced: dict[str, str | None] | None = None) -> None:
        """Hand MLflow work to the MLflow thread, from the scheduling loop (never waits): child runs to ready for
        trials about to be submitted, and ended trials to sync (with the run their live sink delivered to)."""
        with self._work_lock:
            for key in ready:
                if key not in self._requested:
                    self._requested.add(key)
                    self._to_ready[key] = None
            self._to_sync.update(synced or {})
            if self._pump is None and (self._to_ready or self._to_sync):
                self._pump = self._syncer.submit(self._pass, spec, grid_id)

    def _retry_run(self, key: str) -> None:
        """A trial queued again: its run is readied (SCHEDULED) again before its next task."""
        with self._work_lock:
            self._requested.discard(key)
            self._runs.pop(key, None)
            self._submitted.discard(key)

    def _pass(self, spec: GridSpec, grid_id: str) -> None:
        """One pass of the MLflow thread over up to SYNC_BATCH trials of each kind handed to it: runs readied,
        then ended trials synced; queued again while work remains. When MLflow lags behind the cluster (ended
        trials wait), a trial already submitted gets no SCHEDULED run: its run is made once, final, at its sync."""
        with self._work_lock:
            ready = list(itertools.islice(self._to_ready, SYNC_BATCH))
            synced = dict(itertools.islice(self._to_sync.items(), SYNC_BATCH))
            for key in ready:
                del self._to_ready[key]
            for key in synced:
                del self._to_sync[key]
            behind = bool(synced or self._to_sync)
        try:
            self._ready_runs(spec, grid_id, [k for k in ready if not (behind and k in self._submitted)])
            self.sync_mlflow(spec, grid_id, set(synced), {k: run for k, run in synced.items() if run})
        finally:
            with self._work_lock:
                more = self._to_ready or self._to_sync
                self._pump = self._syncer.submit(self._pass, spec, grid_id) if more else None

    def _ready_runs(self, spec: GridSpec, grid_id: str, keys: list[str]) -> None:
        """Ready the child runs of trials about to be submitted: made SCHEDULED, or, held from an earlier
        attempt, SCHEDULED again (a trial that ended meanwhile is left to its sync)."""
        if not keys or (parent := self._parent_run(spec, grid_id)) is None:
            return
        trials = [t for t in self.store.grid_trials(grid_id, keys) if t["status"] in ACTIVE]

        def ready(trial: dict[str, Any]) -> tuple[str, str | None, bool]:
            """(key, its run, whether the run was made or adopted here)."""
            if trial["mlflow_run_id"]:
                try:
                    self.tracker.schedule(trial["mlflow_run_id"])
                except Exception:
                    pass  # its worker sets it running all the same
                return trial["key"], trial["mlflow_run_id"], False
            try:
                # A driver killed between creating a run and saving its id left it behind: adopt it.
                return trial["key"], self._orphans.pop(trial["key"], None) or self.tracker.start_trial(
                    spec.name, grid_id, parent, trial, json.loads(trial["config"])), True
            except Exception:
                return trial["key"], None, False
        outcomes = list(self._calls.map(ready, trials))
        self._runs.update(self._save_runs({key: run for key, run, made in outcomes if made}))
        self._runs.update({key: run for key, run, made in outcomes if run and not made})

    def _run_for_task(self, spec: GridSpec, grid_id: str, key: str) -> dict[str, Any]:
        """What a trial's task needs to stream to its child run, without waiting on MLflow: the run when it is
        ready, else where its worker's sink finds it once the MLflow thread has made it."""
        self._submitted.add(key)
        self._want(spec, grid_id, ready=[key])
        return {"tracking_uri": self.tracker.uri, "experiment": spec.name, "key": key,
                "run_id": self._runs.get(key), "system_metrics_s": self.system_metrics_s}

    def sync_mlflow(self, spec: GridSpec, grid_id: str, keys: set[str] | None = None,
                    live: dict[str, str] | None = None) -> int:
        """Bring ended trials' child runs up to their records, SYNC_BATCH trials at a time (their requests on
        SYNC_THREADS threads, one statement each to save what they did); returns how many remain unsynced. A
        trial without a run gets one made from its record in its final state.

        `live` maps trial keys to the run their worker's sink fully delivered to: those skip reading back.
        """
        trials = [t for t in self.store.grid_trials(grid_id, keys)
                  if not t["mlflow_synced"] and t["status"] in ENDED]
        if not trials or (parent := self._parent_run(spec, grid_id)) is None:
            return len(trials)
        live = live or {}

        def sync(trial: dict[str, Any]) -> tuple[str, str | None, bool]:
            """(key, a run made or adopted here for the trial, whether the run now shows the record)."""
            key, made = trial["key"], None
            config = json.loads(trial["config"])
            try:
                run_id = trial["mlflow_run_id"]
                if run_id is None:
                    run_id = made = self._orphans.pop(key, None)
                fresh = run_id is None
                if fresh:
                    run_id = made = self.tracker.create_trial_run(spec.name, grid_id, parent, trial, config,
                                                                  trial["status"])
                self.tracker.sync(run_id, trial["result"] or {"history": []}, trial["status"],
                                  str(checkpoint_root() / key), delivered=live.get(key) == run_id,
                                  iterations=config["recipe"]["iterations"], config=config if fresh else None)
                return key, made, True
            except Exception:
                return key, made, False

        pending = 0
        for i in range(0, len(trials), SYNC_BATCH):
            outcomes = list(self._calls.map(sync, trials[i:i + SYNC_BATCH]))
            held = self._save_runs({key: run for key, run, _ in outcomes if run})
            # A run that lost to another driver's was deleted: the trial's own run is synced on a later pass.
            done = [key for key, run, ok in outcomes if ok and (run is None or held[key] == run)]
            self.store.set_trials_synced(done)
            pending += len(outcomes) - len(done)
        return pending

    def _eta(self, counts: dict[str, int]) -> float | None:
        """Seconds until the grid ends at this run's pace so far (None before its first trial ended)."""
        started, ended_then = self._eta_origin
        ended = sum(_ended(counts).values())
        left = counts["queued"] + counts["running"]
        if not left:
            return 0.0
        return left * (time.time() - started) / (ended - ended_then) if ended > ended_then else None

    def _refresh_parent(self, spec: GridSpec, grid_id: str, full: bool | None = None,
                        state: str | None = None) -> bool:
        """Bring the parent run up to the grid (on the MLflow thread): progress and ETA each time; the
        comparison, its tables and the report when `full`, by default when trials ended since it was last
        logged (at most every COMPARISON_EVERY_S). False when MLflow did not take it."""
        from . import parent_view
        if not self._children_known and not self._know_children(spec, grid_id):
            return False
        parent = self._parent_run(spec, grid_id)
        now, counts = time.time(), self.store.counts(grid_id)
        ended = _ended(counts)
        if full is None:
            full = ended != self._compared[1] and now - self._compared[0] >= COMPARISON_EVERY_S
        try:
            view = parent_view.build(self.store, spec, grid_id, parent, children=self._children,
                                     eta_s=self._eta(counts), full=full, state=state, mlflow_url=self.tracker.ui_base)
            self.tracker.update_grid(parent, view)
        except Exception:
            return False
        if full:
            self._compared = (now, ended)
        return True

    def _tick_parent(self, spec: GridSpec, grid_id: str, now: float) -> None:
        """From the scheduling loop: queue a parent refresh every PARENT_EVERY_S, unless the last one still
        waits (a slow server never piles them up)."""
        if now >= self._parent_next and (self._parent_job is None or self._parent_job.done()):
            self._parent_next = now + PARENT_EVERY_S
            self._parent_job = self._syncer.submit(self._refresh_parent, spec, grid_id)

    def _end_parent(self, spec: GridSpec, grid_id: str, counts: dict[str, int], terminate: bool) -> bool:
        """The run's last word on the parent: the final comparison and report, then terminated unless runs are
        unsynced. A run that ended no trial, on a parent that showed this grid ended already, only restores its
        state: running a finished grid again stays quick."""
        if _ended(counts) == self._ended_at_open and self._shown_state in ("finished", "decided"):
            shown = self._refresh_parent(spec, grid_id, full=False, state=self._shown_state)
        else:
            shown = self._refresh_parent(spec, grid_id, full=True)
        if not shown:
            return False
        if terminate:
            try:
                self.tracker.end_grid(self.store.grid_run(grid_id), counts)
            except Exception:
                return False
        return True

    # -------------------------------------------------------------------------------------------- run
    def _expand(self, spec: GridSpec, extra: list[GridTrial] = ()) -> tuple[str, list[GridTrial]]:
        """The grid's id and its trials, `extra` ones added, validated (nothing recorded)."""
        tuned = self.store.tuned_recipes() if spec.tuned_names() else {}
        trials = expand_grid(spec, tuned=tuned)
        _reject_duplicates(trials)
        known = {t.key for t in trials}
        trials += [t for t in {t.key: t for t in extra}.values() if t.key not in known]
        return spec.grid_id(tuned), trials

    def _register(self, spec: GridSpec, grid_id: str, trials: list[GridTrial]) -> None:
        self.store.register_grid(grid_id, spec.name, spec.model_dump(mode="json", by_alias=True), trials)

    def submit(self, spec: GridSpec, extra: list[GridTrial] = ()) -> str:
        """Validate, expand and record the grid (no training yet); returns its id. Idempotent."""
        grid_id, trials = self._expand(spec, extra)
        self._register(spec, grid_id, trials)
        return grid_id

    def run(self, spec: GridSpec, sync_timeout_s: float = 60.0, extra: list[GridTrial] = ()) -> dict[str, Any]:
        """Run the grid, plus `extra` trials added to it (more seeds for some cells), to completion."""
        grid_id, trials = self._expand(spec, extra)
        # A new grid of many trials starts on its first ones while the rest are recorded beside the loop:
        # recording 10,000 trials held the first one back by seconds, every slot idle meanwhile. A grid seen
        # before is recorded whole first (its trials' states decide what runs), and so is one whose seeds are
        # fused (a group must not be split at the boundary).
        later: list[GridTrial] = []
        if len(trials) > FIRST_RECORDED and spec.fuse_seeds <= 1 and self.store.grid(grid_id) is None:
            trials, later = trials[:FIRST_RECORDED], trials[FIRST_RECORDED:]
        self._register(spec, grid_id, trials)
        rows = {t["key"]: t for t in self.store.grid_trials(grid_id)}
        reused = sum(1 for t in rows.values() if t["status"] in MEASURED)
        with self._work_lock:
            self._to_ready, self._to_sync, self._requested, self._runs, self._submitted = {}, {}, set(), {}, set()
        self._open_parent(spec, grid_id, reused)
        ensure_ray()
        grid = _GridPass(self, spec, grid_id, rows)
        if later:
            grid.add_later(lambda: self._register(spec, grid_id, later)
                           or self.store.grid_trials(grid_id, [t.key for t in later]))
        beat, cancel_check = _Every(HEARTBEAT_EVERY_S), _Every(CANCEL_CHECK_S)
        display = _Progress(len(rows) + len(later), reused, enabled=self.progress,
                            counts=lambda: self.store.counts(grid_id))
        interrupted = False
        try:
            while grid.busy():
                grid.submit_more()
                grid.record(grid.ended())
                now = time.time()
                grid.expire_overdue(now)
                if beat.due(now):
                    grid.heartbeat()
                if cancel_check.due(now):
                    grid.stop_if_cancelled()
                display.tick(now)
                self._tick_parent(spec, grid_id, now)
        except KeyboardInterrupt:
            interrupted = True
            grid.hand_back("queued")
        finally:
            display.close()

        counts = self.store.counts(grid_id)
        unsynced, parent = self._close_mlflow(spec, grid_id, counts, 0 if interrupted else sync_timeout_s,
                                              interrupted)
        if interrupted:
            raise GridInterrupted(grid_id)
        return {"grid": grid_id, "name": spec.name, "trials": len(grid.rows), "executed": grid.executed,
                "reused": reused + grid.reused_later, "cancelled": grid.cancelled, "counts": counts,
                "mlflow_unsynced": unsynced, "tracking_uri": self.tracker.uri, "mlflow_run_id": parent,
                "mlflow_experiment_id": self.tracker.known_experiment(spec.name)}

    def _close_mlflow(self, spec: GridSpec, grid_id: str, counts: dict[str, int], sync_timeout_s: float,
                      interrupted: bool) -> tuple[int, str | None]:
        """End of a run: ended trials synced, trying again for up to `sync_timeout_s`, then the parent's last
        word: its final comparison and report, and terminated when every run is synced (an interrupted run
        only says so). Returns how many runs stay unsynced, and the parent run."""
        while True:  # the MLflow thread's jobs, and the passes they queue: MLflow catches up with the cluster
            self._syncer.submit(lambda: None).result()
            if self._pump is None:
                break
        deadline = time.time() + sync_timeout_s
        unsynced = self.sync_mlflow(spec, grid_id)
        while unsynced and time.time() < deadline:
            time.sleep(2.0)
            unsynced = self.sync_mlflow(spec, grid_id)
        parent = self.store.grid_run(grid_id)
        if parent and not interrupted and not unsynced:
            self._discard_strays(spec, grid_id, parent)
        if parent and interrupted:
            self._refresh_parent(spec, grid_id, full=False, state="interrupted")
        elif parent and not self._end_parent(spec, grid_id, counts, terminate=not unsynced):
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
        self.executed = self.cancelled = self.reused_later = 0
        self.later: Future | None = None  # the rows of trials being recorded while the first ones run

        cpu, gpu, workers = spec.resources.cpu, spec.resources.gpu, spec.resources.workers
        options = dict(num_cpus=cpu, num_gpus=gpu, max_retries=spec.max_retries, retry_exceptions=False)
        self.remote = ray.remote(runner.trial_fn).options(**options)
        if workers > 1:  # the job's ranks hold the resources; the task that starts it holds none
            self.remote = ray.remote(execute_distributed).options(**{**options, "num_cpus": 0, "num_gpus": 0})
        self.remote_group = ray.remote(runner.group_fn).options(**options) if spec.fuse_seeds > 1 else None
        total = ray.cluster_resources()
        self.slots = max(1, int(min(total.get("CPU", 1) / (cpu * workers),
                                    total.get("GPU", 0) / (gpu * workers) if gpu else float("inf"))))
        self.task_fields = {"threads": max(1, int(cpu)), "device": "cuda" if gpu > 0 else "cpu",
                            "data_dir": spec.data_dir or runner.data_dir, "timeout_s": spec.timeout_s,
                            "resources": {"cpu": cpu, "gpu": gpu, "workers": workers}}
        # Each attempt enforces its own time limit; this backstop only catches a task that never reports
        # back (queueing and Ray's retries after node loss are allowed for).
        self.backstop_s = spec.timeout_s * (spec.max_retries + 1) + QUEUE_SLACK_S if spec.timeout_s else None

    def busy(self) -> bool:
        return bool(self.todo or self.inflight or self.waiting_on_others or self.later)

    def add_later(self, record: Callable[[], list[dict[str, Any]]]) -> None:
        """Run `record` (which records more of the grid's trials and returns their rows) on a thread of its own;
        the loop takes its trials on when it is done."""
        # its errors are raised again in the loop by `result()`, as the store's own are
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-record")
        self.later = pool.submit(record)
        pool.shutdown(wait=False)

    def _take_later(self) -> None:
        if self.later is None or not self.later.done():
            return
        rows, self.later = self.later.result(), None
        self.rows.update((t["key"], t) for t in rows)
        self.todo += [t["key"] for t in rows if t["status"] not in MEASURED]
        self.reused_later = sum(1 for t in rows if t["status"] in MEASURED)

    def submit_more(self) -> None:
        """Claim and submit trials until about two tasks per slot of this grid's share are in flight: the trials
        for every free place claimed at once."""
        self._take_later()
        depth = max(1, 2 * self.slots // max(1, self.runner.share()))
        # MLflow child runs are made on the MLflow thread a few trials ahead: the loop only submits.
        self.runner._want(self.spec, self.grid_id, ready=self.todo[:2 * depth])
        while self.todo and len(self.inflight) < depth:
            groups = []
            while self.todo and len(groups) < depth - len(self.inflight):
                groups.append(_next_group(self.todo, self.rows, self.spec.fuse_seeds))
            claimed = set(self._claim([key for group in groups for key in group]))
            for group in groups:
                mine = [key for key in group if key in claimed]
                if mine:
                    tasks = [self._task(key) for key in mine]
                    ref = self.remote.remote(tasks[0]) if len(tasks) == 1 else self.remote_group.remote(tasks)
                    self.inflight[ref] = (mine, time.time())

    def _claim(self, keys: list[str]) -> list[str]:
        """The trials of `keys` this runner now holds; someone else runs the others (or they ended)."""
        self.held.update(keys)  # before the claim commits: an interrupt right after it still hands them back
        claimed = self.store.claim_many(keys, self.owner)
        others = set(keys).difference(claimed)
        self.held.difference_update(others)
        self.waiting_on_others.update(others)
        return claimed

    def _task(self, key: str) -> dict[str, Any]:
        """What a Ray task needs to train one trial, with where its MLflow child run is (never waited for)."""
        return {"config": self.rows[key]["config"], "checkpoint_dir": str(checkpoint_root() / key),
                **self.task_fields, **self.runner._run_for_task(self.spec, self.grid_id, key)}

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

    def record(self, refs: list[Any]) -> None:
        """Store what ended tasks (each a trial, or a fused group of trials) returned, in one transaction, then
        hand them to the MLflow thread to sync."""
        import ray
        from ray.exceptions import RayTaskError, TaskCancelledError
        results: dict[str, dict[str, Any]] = {}
        live: dict[str, str] = {}
        for ref in refs:
            keys = self.inflight[ref][0]
            try:
                answer = ray.get(ref)
            except TaskCancelledError:
                continue
            except Exception as exc:
                # The trial raised (RayTaskError): retry it, resuming its checkpoint, up to max_retries times.
                # Anything else means Ray already spent its own max_retries on lost workers or nodes: final.
                self._failed(keys, _first_line(exc, 2000),
                             self.spec.max_retries if isinstance(exc, RayTaskError) else 0)
                continue
            for key, result in zip(keys, answer if isinstance(answer, list) else [answer]):
                if run := result.pop(LIVE_KEY, None):
                    live[key] = run
                results[key] = result
        if results:
            self.executed += len(self.store.finish_many(self.owner, results))
            self.runner._want(self.spec, self.grid_id, synced={key: live.get(key) for key in results})
        for ref in refs:
            self._forget(ref)

    def _failed(self, keys: list[str], error: str, retries: int) -> None:
        """A failed attempt: queued again while retries remain (back on `todo`), else an error to sync."""
        for key in keys:
            if self.store.fail(key, self.owner, error, retries) == "queued":
                self.todo.append(key)
                self.runner._retry_run(key)
            else:
                self.runner._want(self.spec, self.grid_id, synced={key: None})

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


def _yield_cpu() -> None:
    """Run this thread MLFLOW_NICE steps nicer than its process: what CPU the loop and trials leave (Linux)."""
    if MLFLOW_NICE and sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + MLFLOW_NICE)
        except OSError:
            pass  # a niceness already at its limit stays where it is


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:limit]


def _ended(counts: dict[str, int]) -> dict[str, int]:
    return {s: counts[s] for s in ENDED}


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
        from .parent_view import progress_line
        counts = self.counts()
        done = sum(counts[s] for s in MEASURED)
        self.bar.update(self.task, completed=done + counts["error"] + counts["cancelled"],
                        description=progress_line(counts))

    def close(self) -> None:
        if self.enabled:
            self._draw()
            self.bar.stop()
