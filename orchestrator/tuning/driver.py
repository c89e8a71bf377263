"""The ask/tell driver: asks up to `parallel` trials, sends each to a Ray task (task.py) and tells the
outcome; resumes a study a dead driver left (heartbeat.py); saves the best recipe in the state store.

COMPLETE and PRUNED trials count toward `n_trials`; FAIL does not, so a rerun fills the study up. The
sampler is reseeded with seed + trials so far, so a resumed study does not replay the first run's samples.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable

from workers.recipes import RecipeError

from ..cluster import ensure_ray
from ..state import BaseStateStore, get_store, safe_url
from ..tracking import Tracker
from .heartbeat import Heartbeat, fail_stale
from .mirror import StudyRuns
from .space import make_pruner, prepare, trial_recipe
from .spec import TuneError, TuneSpec, decode_param, first_line, load_tune_spec
from .storage import open_storage, shared_url
from .task import execute_tuning_trial

POLL_S = 0.2
METRIC_NAMES = {"test_error": "val_error", "test_loss": "val_loss"}  # the trainer's names for its eval split


class StudyInterrupted(Exception):
    """Ctrl-C: this driver's running trials were marked FAIL; the same command resumes the study."""


def _counts(study) -> dict[str, int]:
    counts = dict.fromkeys(("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"), 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


def _open_study(spec: TuneSpec, storage, base):
    import optuna
    from optuna.samplers import TPESampler
    study = optuna.create_study(study_name=spec.name, storage=storage, load_if_exists=True, direction="minimize",
                                sampler=TPESampler(seed=spec.seed), pruner=make_pruner(spec.pruner, base))
    stored = study.user_attrs.get("ablate.spec")
    if stored is None:
        study.set_user_attr("ablate.spec", spec.identity())
    elif stored != spec.identity():
        field = next(k for k in spec.identity() if stored.get(k) != spec.identity()[k])
        raise TuneError(f"study {spec.name!r} exists with another {field} ({stored.get(field)!r}); "
                        f"trials under different settings are not comparable: choose another name")
    return study


def run_study(spec: TuneSpec | dict | str, store: BaseStateStore | str | None = None,
              tracking_uri: str | None = None, trial_fn: Callable[[dict], dict] | None = None) -> dict[str, Any]:
    """Run (or resume) the study until `n_trials` trials are COMPLETE or PRUNED; save the best recipe.

    `trial_fn(task) -> outcome` runs inside Ray workers (default `execute_tuning_trial`). Returns the
    contract's JSON (`summarize`) plus where things live. Raises TuneError before anything runs when the
    spec cannot run, StudyInterrupted on Ctrl-C.
    """
    import optuna

    spec = spec if isinstance(spec, TuneSpec) else load_tune_spec(spec)
    store = get_store(store)
    url = shared_url(store.url)
    base, space, template = prepare(spec, store.tuned_recipes())
    with warnings.catch_warnings():
        # Heartbeats are documented for Study.optimize; ask/tell drivers record them the same way.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        storage = open_storage(url, heartbeat=True)
        study = _open_study(spec, storage, base)
        study.sampler = optuna.samplers.TPESampler(seed=spec.seed + len(study.get_trials(deepcopy=False)))
        runs = StudyRuns(Tracker(tracking_uri), spec)
        runs.open()
        runs.reconcile(study)
        driver = _Driver(spec, url, storage, study, runs, base, space, template, trial_fn or execute_tuning_trial)
        try:
            driver.run()
        except StudyInterrupted:
            runs.close(summarize(study, spec, base), "KILLED")
            raise
        runs.reconcile(study)
    summary = summarize(study, spec, base)
    if summary["best_trial"] is not None:
        store.save_tuned({"name": spec.name, "study": spec.name, "trial": summary["best_trial"],
                          "value": summary["best_value"], "recipe": summary["best_recipe"],
                          "params": summary["best_params"], "spec": spec.model_dump(mode="json", by_alias=True)})
    runs.close(summary)
    return {**summary, "asked": driver.asked, "parallel": driver.parallel, "storage": safe_url(url),
            "tracking_uri": runs.tracker.uri, "mlflow_run_id": runs.parent}


class _Driver:
    """The ask/tell loop: keeps up to `parallel` trials in flight as Ray tasks and tells their outcomes."""

    def __init__(self, spec: TuneSpec, url: str, storage, study, runs: StudyRuns, base, space, template,
                 trial_fn: Callable[[dict], dict]):
        self.spec, self.storage, self.study, self.runs = spec, storage, study, runs
        self.base, self.space, self.template, self.trial_fn = base, space, template, trial_fn
        cpu, gpu = spec.resources.cpu, spec.resources.gpu
        self.task_base = {"store_url": url, "study": spec.name, "pruner": spec.pruner, "threads": max(1, int(cpu)),
                          "device": "cuda" if gpu > 0 else "cpu", "data_dir": spec.data_dir}
        self.beat_every = storage.grace_period / 4  # as the grid scheduler: 4 beats before a trial goes stale
        self.inflight: dict[Any, Any] = {}
        self.adopted: set[int] = set()  # others' RUNNING trials given a heartbeat (see fail_stale)
        fail_stale(study, storage, self.adopted)  # trials a dead driver left RUNNING
        self.asked = self.failed_here = 0
        self.parallel = spec.parallel or 0
        self.counts = _counts(study)

    def wanted(self) -> int:
        """Trials still to ask. Those this call asked and lost are not replaced now (a trial that always
        crashes would repeat forever); those a dead driver left are, once marked FAIL."""
        c = self.counts
        return self.spec.n_trials - c["COMPLETE"] - c["PRUNED"] - c["RUNNING"] - self.failed_here

    def others_running(self) -> int:
        return self.counts["RUNNING"] - len(self.inflight)

    def run(self) -> None:
        import ray
        if self.wanted() <= 0 and self.others_running() <= 0:
            return  # nothing to do: no Ray needed
        ensure_ray()
        cpu, gpu = self.spec.resources.cpu, self.spec.resources.gpu
        total = ray.cluster_resources()
        slots = int(min(total.get("CPU", 1) / cpu, total.get("GPU", 0) / gpu if gpu else float("inf")))
        self.parallel = self.spec.parallel or max(1, slots)
        self.remote = ray.remote(self.trial_fn).options(num_cpus=cpu, num_gpus=gpu, max_retries=0)
        self.heartbeat = Heartbeat(self.storage, self.beat_every)
        last_check = time.time()
        try:
            while True:
                while self.wanted() > 0 and len(self.inflight) < self.parallel:
                    self.submit()
                if not self.inflight and self.wanted() <= 0 and self.others_running() <= 0:
                    break
                if self.inflight:
                    ready = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=POLL_S)[0]
                else:
                    ready = []  # waiting for trials another driver runs (they end, or go stale)
                    time.sleep(POLL_S)
                for ref in ready:
                    self.collect(ref)
                if time.time() - last_check > self.beat_every:
                    ours = frozenset(t._trial_id for t in self.inflight.values())
                    fail_stale(self.study, self.storage, self.adopted, ours)
                    last_check = time.time()
                    self.counts = _counts(self.study)
                elif ready:
                    self.counts = _counts(self.study)
        except KeyboardInterrupt:
            for ref, trial in self.inflight.items():
                ray.cancel(ref, force=True)
                self.tell(trial, _state("FAIL"), error="interrupted")
            raise StudyInterrupted(self.spec.name) from None
        finally:
            self.heartbeat.close()

    def submit(self) -> None:
        trial = self.study.ask(self.space)
        self.heartbeat.add(trial._trial_id)
        self.asked += 1
        self.counts["RUNNING"] += 1
        try:
            recipe = trial_recipe(self.base, trial.params)
        except RecipeError as exc:  # a combination of fields that no recipe allows
            self.lost(trial, str(exc))
            return
        trial.set_user_attr("recipe", recipe.model_dump(mode="json"))
        config = self.template.model_copy(update={"recipe": recipe})
        task = {**self.task_base, "trial_id": trial._trial_id, "number": trial.number,
                "config": config.model_dump_json()}
        self.inflight[self.remote.remote(task)] = trial

    def collect(self, ref) -> None:
        import ray
        trial = self.inflight.pop(ref)
        self.heartbeat.discard(trial._trial_id)
        try:
            out = ray.get(ref)
        except Exception as exc:  # the task crashed, or Ray lost it
            self.lost(trial, first_line(exc))
            return
        history = [{METRIC_NAMES.get(k, k): v for k, v in h.items()} for h in out.get("history", [])]
        if out.get("pruned"):
            self.tell(trial, _state("PRUNED"), history=history)
        elif out.get("evaluated_on") != "validation":
            self.lost(trial, "the trial was scored on the test set", history)
        else:
            self.tell(trial, value=out["value"], history=history)

    def lost(self, trial, error: str, history=None) -> None:
        self.heartbeat.discard(trial._trial_id)
        self.tell(trial, _state("FAIL"), error=error, history=history)
        self.failed_here += 1
        self.counts = _counts(self.study)

    def tell(self, trial, state=None, value=None, error: str | None = None, history=None) -> None:
        import optuna
        try:
            if error:
                trial.set_user_attr("error", error)
            if history is not None:
                trial.set_user_attr("history", history)
            frozen = self.study.tell(trial, value, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            frozen = self.storage.get_trial(trial._trial_id)  # declared dead by another driver meanwhile
        self.runs.log_trial(frozen)
        params = ", ".join(f"{k}={decode_param(k, v)}" for k, v in frozen.params.items())
        value = f" at {frozen.value:.2f}% validation error" if frozen.value is not None else ""
        print(f"trial {frozen.number} {frozen.state.name.lower()}{value} ({params})"
              + (f": {error}" if error else ""), file=sys.stderr)


def _state(name: str):
    from optuna.trial import TrialState
    return TrialState[name]


def summarize(study, spec: TuneSpec, base) -> dict[str, Any]:
    """The contract's JSON: the best trial (lowest final validation error %) and counts by state."""
    counts = _counts(study)
    out: dict[str, Any] = {"study": spec.name, "n_trials": spec.n_trials, "best_trial": None, "best_value": None,
                           "best_params": None, "best_recipe": None, "tuned_recipe": None,
                           "n_complete": counts["COMPLETE"], "n_pruned": counts["PRUNED"],
                           "n_failed": counts["FAIL"], "n_running": counts["RUNNING"]}
    if counts["COMPLETE"]:
        best = study.best_trial
        out.update(best_trial=best.number, best_value=best.value,
                   best_params={k: decode_param(k, v) for k, v in best.params.items()},
                   best_recipe=best.user_attrs.get("recipe") or trial_recipe(base, best.params).model_dump(mode="json"),
                   tuned_recipe=f"tuned/{spec.name}")
    return out
