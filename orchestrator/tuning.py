"""Recipe tuning: an Optuna study whose trials run as Ray tasks, stored in Ablate's state database.

- Storage: Optuna's RDB storage on the state database itself (`ABLATE_STATE_URL`, or sqlite under
  $ABLATE_HOME; Ablate's own tables are prefixed `ablate_`, Optuna's are not). A study survives its
  driver, and several drivers (or optuna-dashboard) can open it at once.
- Ask/tell: the driver asks up to `parallel` trials, sends each to a Ray task and tells the outcome.
  Every trial trains on the training set minus a held-out `validation` fraction and is scored by its
  final validation error (%); the test set is never read.
- Pruning: the task opens the study itself and wraps its trial (`optuna.trial.Trial(study, trial_id)`);
  a `PruningSink` reports each evaluation's validation error and asks the pruner, raising
  `optuna.TrialPruned` out of the training loop when told to stop. The task returns {"pruned": True},
  its slot is free at once, and the driver tells PRUNED.
- Resume: the driver records an Optuna heartbeat for each of its running trials. A RUNNING trial whose
  heartbeat is older than ABLATE_STALE_AFTER_S (the grid scheduler's threshold) belongs to a dead driver
  and is marked FAIL, kept for the record but not repeated. A driver killed between asking a trial and
  its first heartbeat leaves a RUNNING trial Optuna never calls stale; the next driver beats once for
  every RUNNING trial it does not run, so that one goes stale too. COMPLETE and PRUNED trials count toward
  `n_trials`; FAIL does not, so a rerun fills the study up. The sampler is reseeded with
  seed + trials so far, so a resumed study does not replay the first run's samples.
- Reuse: the best trial's full recipe is saved in the state database (table `ablate_tuned_recipes`)
  under the study name with its provenance; `load_tuned` hands them to `expand_grid`, where a grid names
  one as `recipe: tuned/<name>`.
- MLflow is a mirror of the study: one experiment named after the study, a parent run for it, and a
  child run per ended trial (tags `ablate.study`, `optuna.trial`) with its parameters and validation
  curve. Missing child runs (tracking server down, driver killed) are logged on the next run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy import Float, Integer, String, Text, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ablations.spec import DATASET_SHAPES, VARIANTS, load_yaml, validate_mapping, variant_fields
from workers.sinks import MetricsSink

from .grids import NAME_PATTERN, Resources, VariantSpec
from .state import STALE_AFTER_S, StateStore, _sqlite_pragmas, default_state_url

# Recipe fields a space may tune, with the type their bounds must have. `milestone_fractions` is the
# schedule's shape: choices of lists of fractions of the run, e.g. [[0.5, 0.75], [0.25, 0.5, 0.75], []];
# a list, because the number of drops is a choice too and sorted pairs of floats would confuse TPE.
TUNABLE: dict[str, type] = {"lr": float, "warmup_lr": float, "weight_decay": float, "momentum": float,
                            "warmup_iterations": int, "milestone_fractions": list}
# The median of fewer finished curves says little; Optuna's default (5) suits studies of hundreds.
MEDIAN_STARTUP_TRIALS = 3
POLL_S = 0.2
METRIC_NAMES = {"test_error": "val_error", "test_loss": "val_loss"}  # the trainer's names for its eval split


class TuneError(ValueError):
    """A study that cannot run: one line with the field and the reason."""


# ----------------------------------------------------------------------------------------------- the spec
class TuneSpec(BaseModel):
    """Schema in shared/CONTRACT.md ("Tuning specification")."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    dataset: str
    subset: int | None = Field(None, ge=1)
    data_dir: str | None = Field(None, description="datasets root on every node, as in a grid")
    depth: int = Field(ge=1)
    block: Literal["basic", "bottleneck"] | None = None
    width: int | None = Field(None, ge=1, le=1024)
    variant: str | VariantSpec = "original"
    base: str | dict[str, Any] = "mini-cpu"
    space: dict[str, dict[str, Any]]
    n_trials: int = Field(20, ge=1, le=10_000)
    pruner: Literal["median", "hyperband", "none"] = "median"
    validation: float = Field(0.1, gt=0.0, lt=1.0, description="held-out fraction of the training set")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    parallel: int | None = Field(None, ge=1, le=1024, description="default: Ray CPUs (or GPUs) / resources")
    resources: Resources = Resources()

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value):
        if value not in DATASET_SHAPES:
            raise ValueError(f"unknown dataset {value!r}; choose one of: {', '.join(DATASET_SHAPES)}")
        return value

    @field_validator("variant")
    @classmethod
    def _variant(cls, value):
        if isinstance(value, str) and value not in VARIANTS:
            raise ValueError(f"unknown variant {value!r}; catalogue: {', '.join(VARIANTS)} "
                             f"(or write a mapping with name and model fields)")
        return value

    @field_validator("space")
    @classmethod
    def _space(cls, value):
        if not value:
            raise TuneError(f"space: give at least one field to tune: {', '.join(TUNABLE)}")
        for field, entry in value.items():
            _check_entry(field, entry)
        return value

    @model_validator(mode="after")
    def _data_dir(self) -> "TuneSpec":
        if self.data_dir is not None and (not Path(self.data_dir).is_absolute() or ".." in Path(self.data_dir).parts):
            raise ValueError("data_dir must be an absolute path without '..' (every node resolves it alike)")
        return self

    def network_fields(self) -> dict[str, Any]:
        fields = variant_fields(self.variant) if isinstance(self.variant, str) else self.variant.fields()
        own = {k: v for k, v in (("block", self.block), ("width", self.width)) if v is not None}
        return {**fields, **own, "depth": self.depth}

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same study: trials under other values would not be comparable."""
        return self.model_dump(mode="json", by_alias=True, include={
            "dataset", "subset", "depth", "block", "width", "variant", "base", "space", "validation", "seed"})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_entry(field: str, entry: Any) -> None:
    """Structure of one search-space entry (ranges against the recipe are checked in `search_space`)."""
    where = f"space.{field}"
    if field not in TUNABLE:
        raise TuneError(f"{where}: not a tunable field; tunable: {', '.join(TUNABLE)}")
    kind = TUNABLE[field]
    if not isinstance(entry, dict):
        raise TuneError(f"{where}: write {{low, high, log}} or {{choices: [...]}}, got {entry!r}")
    if "choices" in entry:
        if set(entry) != {"choices"}:
            raise TuneError(f"{where}: choices go alone, without {', '.join(sorted(set(entry) - {'choices'}))}")
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"{where}: choices must be a non-empty list, got {choices!r}")
        for c in choices:
            _check_value(where, kind, c)
        if len({_encode(c) for c in choices}) != len(choices):
            raise TuneError(f"{where}: choices repeat: {choices}")
        return
    if kind is list:
        raise TuneError(f"{where}: the schedule's shape is a choice: {{choices: [[0.5, 0.75], [0.3, 0.6, 0.9]]}}")
    unknown = set(entry) - {"low", "high", "log"}
    if unknown:
        raise TuneError(f"{where}: unknown key {sorted(unknown)[0]!r}; write {{low, high, log}} or {{choices}}")
    if "low" not in entry or "high" not in entry:
        raise TuneError(f"{where}: a range needs both low and high, got {entry}")
    low, high, log = entry["low"], entry["high"], entry.get("log", False)
    for v in (low, high):
        _check_value(where, kind, v)
    if not isinstance(log, bool):
        raise TuneError(f"{where}: log is true or false, got {log!r}")
    if not low < high:
        raise TuneError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise TuneError(f"{where}: a log scale needs low > 0, got {low}")


def _check_value(where: str, kind: type, value: Any) -> None:
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise TuneError(f"{where}: an integer field takes integer values, got {value!r}")
    if kind is float and not _is_number(value):
        raise TuneError(f"{where}: expects numbers, got {value!r}")
    if kind is list:
        if not isinstance(value, list) or not all(_is_number(f) and 0 < f < 1 for f in value):
            raise TuneError(f"{where}: each choice is a list of fractions of the run in (0, 1), got {value!r}")
        if value != sorted(set(value)):
            raise TuneError(f"{where}: fractions must be strictly increasing, got {value}")


def _encode(value: Any) -> Any:
    """Optuna's categorical choices are scalars: a milestone list becomes '0.5,0.75' ('none' for [])."""
    if isinstance(value, list):
        return ",".join(f"{f:g}" for f in value) or "none"
    return value


def _decode(field: str, value: Any) -> Any:
    if field == "milestone_fractions":
        return [] if value == "none" else [float(f) for f in value.split(",")]
    return value


def parse_tune_spec(data: Any) -> TuneSpec:
    return validate_mapping(TuneSpec, data, TuneError, "tune spec", "name, dataset, depth, space, n_trials, …")


def load_tune_spec(source: str | os.PathLike | dict) -> TuneSpec:
    """A YAML/JSON file, YAML/JSON text, or an already parsed mapping."""
    if isinstance(source, dict):
        return parse_tune_spec(source)
    text = str(source)
    if "\n" not in text:
        try:
            text = Path(text).read_text()
        except FileNotFoundError:
            raise TuneError(f"tuning spec file {source} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TuneError(f"cannot read tuning spec {source}: {exc}") from None
    return parse_tune_spec(load_yaml(text, TuneError, "tuning spec"))


# ------------------------------------------------------------------------------- space, recipes, pruners
def trial_recipe(base, params: dict[str, Any]):
    """The base recipe with a trial's parameters on top; milestone fractions become iterations."""
    from workers.recipes import make_recipe
    fields = base.model_dump()
    for field, value in params.items():
        if field == "milestone_fractions":
            fields["milestones"] = [round(f * base.iterations) for f in _decode(field, value)]
        else:
            fields[field] = value
    return make_recipe(fields)


def search_space(spec: TuneSpec, base) -> dict[str, Any]:
    """Optuna distributions for the space, each bound and choice checked as a recipe on the base."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from workers.recipes import RecipeError
    out: dict[str, Any] = {}
    for field, entry in spec.space.items():
        values = entry["choices"] if "choices" in entry else [entry["low"], entry["high"]]
        for v in values:
            try:
                trial_recipe(base, {field: _encode(v)})
            except RecipeError as exc:
                raise TuneError(f"space.{field}: {v!r} makes an invalid recipe: {exc}") from None
        if "choices" in entry:
            out[field] = CategoricalDistribution([_encode(c) for c in entry["choices"]])
        elif TUNABLE[field] is int:
            out[field] = IntDistribution(entry["low"], entry["high"], log=entry.get("log", False))
        else:
            out[field] = FloatDistribution(float(entry["low"]), float(entry["high"]), log=entry.get("log", False))
    return out


def make_pruner(name: str, recipe):
    """Steps are training iterations: evaluations come every `eval_every`, the run ends at `iterations`.

    The median pruner waits for the recipe's first learning-rate drop: before it, a larger rate plateaus
    at a higher error that the drop then erases (the paper's curves), so early medians favour small rates.
    """
    import optuna
    if name == "median":
        first_drop = recipe.milestones[0] if recipe.milestones else 0
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=first_drop)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=recipe.eval_every, max_resource=recipe.iterations)
    return optuna.pruners.NopPruner()


def _prepare(spec: TuneSpec, tuned: dict[str, dict[str, Any]]):
    """(base recipe, distributions, template TrialConfig): everything checked before a trial runs."""
    from ablations.spec import SpecError
    from workers.recipes import RecipeError, resolve_recipe, training_size
    from workers.trainer import trial_config
    try:
        base = resolve_recipe(spec.base, tuned=tuned,
                              train_size=training_size(spec.dataset, spec.subset, spec.validation))
    except RecipeError as exc:
        raise TuneError(f"base: {exc}") from None
    space = search_space(spec, base)
    try:
        template = trial_config(spec.network_fields(), spec.dataset, base, spec.seed, subset=spec.subset,
                                validation=spec.validation)
    except SpecError as exc:
        raise TuneError(f"model: {exc}") from None
    return base, space, template


# ------------------------------------------------------------------------------------------------ storage
def _absolute(url: str) -> str:
    """Ray workers start elsewhere: a relative sqlite path must mean the driver's file."""
    if not url.startswith("sqlite:"):
        return url
    path = url.removeprefix("sqlite:///")
    if url in ("sqlite://", "sqlite:///:memory:") or path == url:
        raise TuneError(f"tuning needs a database every Ray worker can open, not {url}")
    return f"sqlite:///{Path(path).resolve()}"


def open_storage(url: str, heartbeat: bool = False):
    """Optuna's RDB storage on the state database, with the state store's sqlite discipline (WAL, a
    long busy timeout, BEGIN IMMEDIATE) so the driver and its tasks never fail on a locked database."""
    import optuna
    sqlite = url.startswith("sqlite:")
    kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True}
    beat = {"heartbeat_interval": max(1, round(STALE_AFTER_S / 4)), "grace_period": max(1, round(STALE_AFTER_S))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **(beat if heartbeat else {}))
    if sqlite:
        event.listen(storage.engine, "connect", _sqlite_pragmas)
        event.listen(storage.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        storage.engine.dispose()  # connections opened before the listeners lack them
    return storage


class _Base(DeclarativeBase):
    pass


class TunedRecipeRow(_Base):
    """The best recipe of a study, under the study's name; rewritten when the study finds a better one."""
    __tablename__ = "ablate_tuned_recipes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    study: Mapped[str] = mapped_column(String(64))
    trial: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    recipe: Mapped[str] = mapped_column(Text)  # every Recipe field, JSON
    params: Mapped[str] = mapped_column(Text)
    spec: Mapped[str] = mapped_column(Text)  # what it was tuned for: dataset, depth, variant, space, …
    updated_at: Mapped[float] = mapped_column(Float)


def _tuned_store(url: str | None) -> StateStore:
    store = StateStore(url)
    _Base.metadata.create_all(store.engine)
    return store


def save_tuned(store_url: str | None, record: dict[str, Any]) -> None:
    store = _tuned_store(store_url)
    with store.sessions.begin() as s:
        row = s.get(TunedRecipeRow, record["name"]) or TunedRecipeRow(name=record["name"])
        row.study, row.trial, row.value = record["study"], record["trial"], record["value"]
        row.recipe, row.params = json.dumps(record["recipe"]), json.dumps(record["params"])
        row.spec, row.updated_at = json.dumps(record["spec"]), time.time()
        s.merge(row)


def tuned_records(store_url: str | None = None) -> list[dict[str, Any]]:
    """Every saved tuned recipe with its provenance (study, trial number, validation error, spec)."""
    store = _tuned_store(store_url)
    with store.sessions() as s:
        rows = list(s.scalars(select(TunedRecipeRow).order_by(TunedRecipeRow.name)))
    return [{"name": r.name, "study": r.study, "trial": r.trial, "value": r.value, "recipe": json.loads(r.recipe),
             "params": json.loads(r.params), "spec": json.loads(r.spec), "updated_at": r.updated_at} for r in rows]


def load_tuned(store_url: str | None = None) -> dict[str, dict[str, Any]]:
    """{name: recipe fields} for `expand_grid(spec, tuned=...)`, where a grid says `recipe: tuned/<name>`."""
    return {r["name"]: r["recipe"] for r in tuned_records(store_url)}


# -------------------------------------------------------------------------------------------- the task
class PruningSink(MetricsSink):
    """Reports each evaluation's validation error to the trial and stops training when the pruner says so.

    Unlike the other sinks it waits on the database and raises (`optuna.TrialPruned`): a pruning decision
    is only worth something before the next iterations are spent. Once per evaluation, not per step.
    """

    def __init__(self, trial, iterations: int):
        self.trial, self.iterations = trial, iterations
        self.records: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        import optuna
        self.records.append({"step": step, **metrics})
        if metrics.get("test_error") is None or any(r["step"] == step for r in self.records[:-1]):
            return  # a diverged run's last word at an already reported step
        self.trial.report(metrics["test_error"], step)
        # At the last evaluation nothing is left to save: the trial completes with its final value.
        if step < self.iterations and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at iteration {step}")


def execute_tuning_trial(task: dict[str, Any], train: Callable[..., dict] | None = None) -> dict[str, Any]:
    """The Ray task body: train one Optuna trial on the validation split, reporting as it goes.

    `train` stands in for `workers.trainer.run_trial` (same signature): the pruning tests feed curves.
    """
    import optuna
    from workers.trainer import TrialConfig, run_trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = TrialConfig.model_validate_json(task["config"])
    study = optuna.load_study(study_name=task["study"], storage=open_storage(task["store_url"]),
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=make_pruner(task["pruner"], config.recipe))
    sink = PruningSink(optuna.trial.Trial(study, task["trial_id"]), config.recipe.iterations)
    try:
        result = (train or run_trial)(config, sink=sink, threads=task["threads"], device=task["device"],
                                      data_dir=task.get("data_dir"))
    except optuna.TrialPruned:
        return {"pruned": True, "step": sink.records[-1]["step"], "history": sink.records}
    return {"pruned": False, "value": result["test_error"], "status": result["status"],
            "evaluated_on": result["evaluated_on"], "history": result["history"]}


# ---------------------------------------------------------------------------------------------- MLflow
class StudyRuns:
    """The study's MLflow mirror. MLflow trouble never stops tuning: the first failure is reported once,
    the rest of this run skips MLflow, and the next run logs what is missing from the study's record."""

    def __init__(self, tracker, spec: TuneSpec):
        self.tracker, self.spec = tracker, spec
        self.parent: str | None = None
        self.logged: set[int] = set()
        self.down = False

    def _guard(self, fn: Callable[[], Any]) -> Any:
        if self.down:
            return None
        try:
            return fn()
        except Exception as exc:
            self.down = True
            print(f"ablate tune: MLflow unreachable ({_first_line(exc, 200)}); runs will be logged by the next "
                  f"`ablate tune`", file=sys.stderr)
            return None

    def open(self) -> None:
        self._guard(self._open)

    def _open(self) -> None:
        from mlflow.entities import Param
        from .tracking import flatten
        client, name = self.tracker.client, self.spec.name
        exp = self.tracker.experiment(name)
        found = client.search_runs([exp], f"tags.`ablate.study` = '{name}' and tags.`ablate.role` = 'study'",
                                   max_results=1)
        if found:
            self.parent = found[0].info.run_id
            client.update_run(self.parent, status="RUNNING")
        else:
            run = client.create_run(exp, run_name=name, tags={"ablate.study": name, "ablate.role": "study"})
            self.parent = run.info.run_id
            params = [Param(k, v) for k, v in flatten("", self.spec.identity()).items()][:100]
            client.log_batch(self.parent, params=params)
        children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{self.parent}'", max_results=50_000)
        for run in children:
            if run.info.status == "RUNNING":
                client.delete_run(run.info.run_id)  # half-logged by a driver that died: logged again
            else:
                self.logged.add(int(run.data.tags["optuna.trial"]))

    def log_trial(self, trial) -> None:
        if self.parent is not None and trial.number not in self.logged:
            self._guard(lambda: self._log_trial(trial))

    def _log_trial(self, trial) -> None:
        from mlflow.entities import Metric, Param
        from .tracking import flatten
        client, state = self.tracker.client, trial.state.name
        tags = {"mlflow.parentRunId": self.parent, "ablate.study": self.spec.name, "optuna.trial": str(trial.number),
                "optuna.state": state}
        if trial.user_attrs.get("error"):
            tags["ablate.error"] = str(trial.user_attrs["error"])[:4000]
        run_id = client.create_run(self.tracker.experiment(self.spec.name), run_name=f"trial-{trial.number}",
                                   tags=tags).info.run_id
        params = {**{k: str(_decode(k, v)) for k, v in trial.params.items()},
                  **flatten("recipe", trial.user_attrs.get("recipe", {}))}
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()][:100])
        now = int(time.time() * 1000)
        history = trial.user_attrs.get("history", [])
        metrics = [Metric(k, float(v), now, int(h["step"])) for h in history for k, v in h.items()
                   if k != "step" and v is not None]
        seen = {h["step"] for h in history}
        metrics += [Metric("val_error", float(v), now, int(step)) for step, v in trial.intermediate_values.items()
                    if step not in seen]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.set_terminated(run_id, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))
        self.logged.add(trial.number)

    def reconcile(self, study) -> None:
        from optuna.trial import TrialState
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                               TrialState.FAIL)):
            self.log_trial(trial)

    def close(self, summary: dict[str, Any], status: str = "FINISHED") -> None:
        if self.parent is not None:
            self._guard(lambda: self._close(summary, status))

    def _close(self, summary: dict[str, Any], status: str) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(summary[k]), now, 0) for k in ("best_value", "n_complete", "n_pruned", "n_failed")
                   if summary.get(k) is not None]
        self.tracker.client.log_batch(self.parent, metrics=metrics)
        self.tracker.client.set_terminated(self.parent, status)


# ---------------------------------------------------------------------------------------------- driver
class StudyInterrupted(Exception):
    """Ctrl-C: this driver's running trials were marked FAIL; the same command resumes the study."""


class _Heartbeat:
    """Records an Optuna heartbeat for each trial this driver runs, from a thread, so a slow MLflow call
    on the driver's loop never makes a live trial look abandoned."""

    def __init__(self, storage, every: float):
        self.storage, self.every = storage, every
        self.ids: set[int] = set()
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tune-heartbeat", daemon=True)
        self.thread.start()

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)
        with self.lock:
            self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            with self.lock:
                ids = list(self.ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:
                    pass  # the next beat tries again; only a long silence fails the trial

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def _fail_stale(study, storage, adopted: set[int], ours: frozenset[int] = frozenset()) -> None:
    """Marks FAIL the RUNNING trials whose driver died. Optuna only judges trials that have a heartbeat;
    one asked by a driver killed before its first beat would wait forever. Beating once for each RUNNING
    trial that is not ours gives it a heartbeat: a live driver keeps beating, a dead one never does."""
    import optuna
    optuna.storages.fail_stale_trials(study)  # first: a stale heartbeat must not be refreshed below
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t._trial_id not in ours and t._trial_id not in adopted:
            storage.record_heartbeat(t._trial_id)
            adopted.add(t._trial_id)


def _counts(study) -> dict[str, int]:
    counts = dict.fromkeys(("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"), 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] += 1
    return counts


def _first_line(exc: BaseException, limit: int = 2000) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:limit]


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


def run_study(spec: TuneSpec | dict | str, store_url: str | None = None, tracking_uri: str | None = None,
              trial_fn: Callable[[dict], dict] | None = None) -> dict[str, Any]:
    """Run (or resume) the study until `n_trials` trials are COMPLETE or PRUNED; save the best recipe.

    `trial_fn(task) -> outcome` runs inside Ray workers (default `execute_tuning_trial`). Returns the
    contract's JSON (`summarize`) plus where things live. Raises TuneError before anything runs when the
    spec cannot run, StudyInterrupted on Ctrl-C.
    """
    import optuna
    from sqlalchemy.engine import make_url
    from .tracking import Tracker

    spec = spec if isinstance(spec, TuneSpec) else load_tune_spec(spec)
    url = _absolute(store_url or default_state_url())
    base, space, template = _prepare(spec, load_tuned(url))
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
        save_tuned(url, {"name": spec.name, "study": spec.name, "trial": summary["best_trial"],
                         "value": summary["best_value"], "recipe": summary["best_recipe"],
                         "params": summary["best_params"], "spec": spec.model_dump(mode="json", by_alias=True)})
    runs.close(summary)
    return {**summary, "asked": driver.asked, "parallel": driver.parallel,
            "storage": make_url(url).render_as_string(hide_password=True),
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
        self.inflight: dict[Any, Any] = {}
        self.adopted: set[int] = set()  # others' RUNNING trials given a heartbeat (see _fail_stale)
        _fail_stale(study, storage, self.adopted)  # trials a dead driver left RUNNING
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
        import optuna
        import ray
        from .scheduler import ensure_ray
        if self.wanted() <= 0 and self.others_running() <= 0:
            return  # nothing to do: no Ray needed
        ensure_ray()
        cpu, gpu = self.spec.resources.cpu, self.spec.resources.gpu
        total = ray.cluster_resources()
        slots = int(min(total.get("CPU", 1) / cpu, total.get("GPU", 0) / gpu if gpu else float("inf")))
        self.parallel = self.spec.parallel or max(1, slots)
        self.remote = ray.remote(self.trial_fn).options(num_cpus=cpu, num_gpus=gpu, max_retries=0)
        self.heartbeat = _Heartbeat(self.storage, STALE_AFTER_S / 4)
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
                if time.time() - last_check > STALE_AFTER_S / 4:
                    ours = frozenset(t._trial_id for t in self.inflight.values())
                    _fail_stale(self.study, self.storage, self.adopted, ours)
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
        from workers.recipes import RecipeError
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
            self.lost(trial, _first_line(exc))
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
        params = ", ".join(f"{k}={_decode(k, v)}" for k, v in frozen.params.items())
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
                   best_params={k: _decode(k, v) for k, v in best.params.items()},
                   best_recipe=best.user_attrs.get("recipe") or trial_recipe(base, best.params).model_dump(mode="json"),
                   tuned_recipe=f"tuned/{spec.name}")
    return out
