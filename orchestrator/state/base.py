"""The state store's contract, and its operations, written once over SQLAlchemy sessions.

A backend only says how to open sessions on Ablate's tables (models.py) with the guarantees
`BaseStateStore` asks of them; every operation is written here, so all backends (sql.py: sqlite and
PostgreSQL) keep one contract, checked by one set of tests (tests/test_state.py runs them on both).
"""
from __future__ import annotations

import json
import os
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Iterable

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ablations.vocabulary import ENDED, MEASURED, STATUSES

from .models import (LOOK_FIELDS, AttemptRow, GridRow, GridTrialRow, SequentialLookRow, SequentialPlanRow,
                     TrialRow, TunedRecipeRow)

# A running trial whose owner stopped heartbeating this long is taken over (owners beat 4× as often).
STALE_AFTER_S = float(os.environ.get("ABLATE_STALE_AFTER_S", "30"))
# IN lists and multi-row inserts go in chunks: a few statements per grid, not one per trial, and under
# sqlite's limit on bound parameters.
CHUNK = 500
# "Insert unless the key exists" is spelled per database; both spell it ON CONFLICT.
_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
# A result's figures that the trial row holds in columns of their own (the tables read them without JSON).
_RESULT_COLUMNS = ("test_error", "train_loss", "train_error", "test_size", "precision", "test_error_top5")


class StateError(RuntimeError):
    """The state database cannot be used (newer schema, unreachable, unsupported)."""


class BaseStateStore(ABC):
    """Grids, trials, their attempts and results, and tuned recipes: everything Ablate must not lose.

    A trial is keyed by the hash of its resolved configuration and shared by every grid containing it.
    Its status changes only by these transitions:

        queued            → running            `claim`
        running (stale)   → running            `claim` by another owner (takeover)
        running           → finished|diverged  `finish`: the result is stored
        running           → queued|error       `fail`: queued again while attempts remain
        running           → queued|cancelled   `release` (interrupted: resumable; cancelled)
        queued            → cancelled          `cancel_grid`
        error|cancelled   → queued             `register_grid` (a rerun gives it fresh attempts, and its
                                                child run is synced again when it ends)

    Contract, for every backend:
    - Atomic: each method is one transaction; a crash at any instant leaves the state before the call or
      after it. Of any number of concurrent `claim`s of a trial (threads, processes, machines) at most one
      succeeds: a running trial has exactly one owner.
    - Owned: `finish`, `fail`, `release` and `heartbeat` change a trial only for its current owner. An
      owner whose heartbeat went older than `stale_after` may lose the trial to a takeover, and then
      loses its write as well (`finish` returns False, nothing is written).
    - Immutable: a `finished` or `diverged` trial never changes again: no method rewrites its status,
      result or metrics; grids that contain it reuse it. (Its MLflow bookkeeping is not part of it: its
      child run id, set once by `set_trial_run`, and its sync flag, `set_trial_synced`.)
    - Idempotent: `register_grid` again with the same trials changes nothing but the grid's spec, its
      cancelled flag and the transition above (error|cancelled → queued); with more trials it adds them.
      Concurrent registrations of overlapping grids all succeed.
    - Reads see committed transactions only. `results_table` returns rows in one fixed order (dataset,
      depth, variant, seed), whatever the order of registration.
    - Thread-safe: a store may be shared by any number of threads (every call has its own session).
    - Across processes: any number of processes, on any number of machines, may open one database at
      once; opening brings its schema to this release's under a lock and refuses a newer one. sqlite
      only where every process sees the same local file (not over a network filesystem).

    A backend implements `url`, `transaction` and `snapshot`; they must give what the methods rely on:
    `transaction` commits all or nothing and locks the rows it updates or reads `with_for_update` until
    it ends (READ COMMITTED or stronger); `snapshot` sees only committed data and writes nothing.
    """

    @property
    @abstractmethod
    def url(self) -> str:
        """Where the database is: a SQLAlchemy URL that other processes (Ray workers, Optuna) can open."""

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Session]:
        """A session in one read-write transaction, committed when the block ends, rolled back on error."""

    @abstractmethod
    def snapshot(self) -> AbstractContextManager[Session]:
        """A session for reading."""

    # ------------------------------------------------------------------------------------------- grids
    def register_grid(self, grid_id: str, name: str, spec: dict, trials: Iterable[Any]) -> None:
        """Record the grid and its trials; trials that ended in error or were cancelled are queued again."""
        now = time.time()
        keyed: dict[str, Any] = {}
        for t in trials:
            keyed.setdefault(t.key, t)  # a key is a hash of the configuration: computed once here
        # In key order: concurrent registrations of overlapping grids lock rows in one order, never deadlock.
        keys = sorted(keyed)
        with self.transaction() as s:
            insert = _INSERT[s.get_bind().dialect.name]
            s.execute(insert(GridRow.__table__).values(id=grid_id, name=name, spec=json.dumps(spec), created_at=now,
                                                       cancelled=False)
                      # Same id, same trials; presentation fields (paper_setting) may change: keep the latest.
                      .on_conflict_do_update(index_elements=["id"], set_={"spec": json.dumps(spec),
                                                                          "cancelled": False}))
            for chunk in _chunks(keys):
                _insert_new(s, TrialRow.__table__, [
                    {"key": k, "config": keyed[k].config.model_dump_json(), "status": "queued", "attempts": 0,
                     "updated_at": now} for k in chunk])
                s.execute(update(TrialRow).where(TrialRow.key.in_(chunk), TrialRow.status.in_(("error", "cancelled")))
                          .values(status="queued", attempts=0, error=None, updated_at=now, mlflow_synced=False))
                _insert_new(s, GridTrialRow.__table__, [
                    {"grid_id": grid_id, "trial_key": k, "dataset": keyed[k].dataset, "depth": keyed[k].depth,
                     "variant": keyed[k].variant, "seed": keyed[k].seed} for k in chunk])

    def grid(self, grid_id: str) -> GridRow | None:
        with self.snapshot() as s:
            return s.get(GridRow, grid_id)

    def grids(self) -> list[GridRow]:
        with self.snapshot() as s:
            return list(s.scalars(select(GridRow).order_by(GridRow.created_at)))

    def find_grid(self, ref: str) -> GridRow | None:
        """A grid by id, or the newest grid of that name."""
        with self.snapshot() as s:
            row = s.get(GridRow, ref)
            if row is None:
                row = s.scalars(select(GridRow).where(GridRow.name == ref)
                                .order_by(GridRow.created_at.desc())).first()
            return row

    def set_grid_run(self, grid_id: str, run_id: str) -> None:
        with self.transaction() as s:
            s.get(GridRow, grid_id).mlflow_run_id = run_id

    def grid_run(self, grid_id: str) -> str | None:
        """The grid's MLflow parent run: its own, else the one an earlier grid of the same name holds
        (which the grid then holds too)."""
        held = self.grid(grid_id).mlflow_run_id
        if held is not None:
            return held  # the common case: read only
        with self.transaction() as s:
            grid = s.get(GridRow, grid_id, with_for_update=True)
            if grid.mlflow_run_id is None:
                grid.mlflow_run_id = s.scalars(select(GridRow.mlflow_run_id).where(
                    GridRow.name == grid.name, GridRow.mlflow_run_id.is_not(None))
                    .order_by(GridRow.created_at.desc())).first()
            return grid.mlflow_run_id

    def run_grids(self, run_id: str) -> list[str]:
        """The ids of the grids an MLflow parent run has held, oldest first."""
        with self.snapshot() as s:
            return list(s.scalars(select(GridRow.id).where(GridRow.mlflow_run_id == run_id)
                                  .order_by(GridRow.created_at)))

    def set_trial_run(self, key: str, run_id: str) -> str:
        """Give a trial its MLflow child run unless it holds one already; returns the run it holds (the first
        saved wins when two drivers made one at once)."""
        return self.set_trial_runs({key: run_id})[key]

    def set_trial_runs(self, runs: dict[str, str]) -> dict[str, str]:
        """`set_trial_run` for several trials in one transaction: {trial key: the run it holds}."""
        if not runs:
            return {}
        trials = TrialRow.__table__
        with self.transaction() as s:
            s.execute(update(trials).where(trials.c.key == bindparam("b_key"), trials.c.mlflow_run_id.is_(None))
                      .values(mlflow_run_id=bindparam("b_run")), [{"b_key": k, "b_run": r} for k, r in runs.items()])
            held = select(TrialRow.key, TrialRow.mlflow_run_id).where(TrialRow.key.in_(list(runs)))
            return dict(s.execute(held).all())

    def set_trial_synced(self, key: str) -> None:
        self.set_trials_synced([key])

    def set_trials_synced(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        with self.transaction() as s:
            for chunk in _chunks(keys):
                s.execute(update(TrialRow).where(TrialRow.key.in_(chunk)).values(mlflow_synced=True))

    def unsynced(self, grid_id: str) -> int:
        """How many of the grid's ended trials their MLflow child runs do not show yet (MLflow's backlog)."""
        with self.snapshot() as s:
            return s.scalar(select(func.count()).select_from(GridTrialRow).join(
                TrialRow, TrialRow.key == GridTrialRow.trial_key)
                .where(GridTrialRow.grid_id == grid_id, TrialRow.status.in_(ENDED), TrialRow.mlflow_synced.is_(False)))

    def grid_trials(self, grid_id: str, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The grid's trials (or those of `keys`) with their labels, state and result."""
        # Columns, not ORM objects: a driver reads every trial of its grid before the first one starts, and
        # loading 10,000 pairs of entities took 0.6 s of that.
        query = (select(TrialRow.key, GridTrialRow.dataset, GridTrialRow.depth, GridTrialRow.variant,
                        GridTrialRow.seed, TrialRow.status, TrialRow.attempts, TrialRow.test_error,
                        TrialRow.train_loss, TrialRow.error, TrialRow.mlflow_run_id, TrialRow.mlflow_synced,
                        TrialRow.result, TrialRow.config)
                 .join(TrialRow, TrialRow.key == GridTrialRow.trial_key).where(GridTrialRow.grid_id == grid_id))
        if keys is not None:
            query = query.where(GridTrialRow.trial_key.in_(list(keys)))
        with self.snapshot() as s:
            rows = s.execute(query).mappings().all()
        return [{**row, "result": json.loads(row["result"]) if row["result"] else None} for row in rows]

    def results_table(self, grid_id: str):
        """The grid's results as a pyarrow Table in one query: the fast read path of the tables."""
        import pyarrow as pa  # only the tables need it, not every process that opens a store
        names = ["dataset", "depth", "variant", "seed", "status", "test_error", "train_loss", "train_error",
                 "test_size", "precision", "test_error_top5"]
        query = (select(GridTrialRow.dataset, GridTrialRow.depth, GridTrialRow.variant, GridTrialRow.seed,
                        TrialRow.status, TrialRow.test_error, TrialRow.train_loss, TrialRow.train_error,
                        TrialRow.test_size, TrialRow.precision, TrialRow.test_error_top5)
                 .join(TrialRow, TrialRow.key == GridTrialRow.trial_key).where(GridTrialRow.grid_id == grid_id)
                 # A fixed order: the bootstrap resamples by position, so the same results give the same CI.
                 .order_by(GridTrialRow.dataset, GridTrialRow.depth, GridTrialRow.variant, GridTrialRow.seed))
        with self.snapshot() as s:
            rows = s.execute(query).all()
        types = {"test_size": pa.int64(), "precision": pa.string(), "test_error_top5": pa.float64()}
        return pa.table({name: pa.array([r[i] for r in rows], types.get(name)) for i, name in enumerate(names)})

    def trial_durations(self, grid_id: str) -> list[dict[str, Any]]:
        """Seconds each ended trial of the grid took, summed over its attempts, with its cell."""
        query = (select(GridTrialRow.dataset, GridTrialRow.depth, GridTrialRow.variant, GridTrialRow.seed,
                        func.sum(AttemptRow.ended_at - AttemptRow.started_at))
                 .join(AttemptRow, AttemptRow.trial_key == GridTrialRow.trial_key)
                 .join(TrialRow, TrialRow.key == GridTrialRow.trial_key)
                 .where(GridTrialRow.grid_id == grid_id, AttemptRow.ended_at.is_not(None),
                        TrialRow.status.in_(MEASURED))
                 .group_by(GridTrialRow.dataset, GridTrialRow.depth, GridTrialRow.variant, GridTrialRow.seed))
        with self.snapshot() as s:
            rows = s.execute(query).all()
        return [{"dataset": d, "depth": n, "variant": v, "seed": seed, "seconds": float(t)} for d, n, v, seed, t in rows]

    def counts(self, grid_id: str) -> dict[str, int]:
        with self.snapshot() as s:
            rows = s.execute(select(TrialRow.status, func.count()).join(
                GridTrialRow, TrialRow.key == GridTrialRow.trial_key)
                .where(GridTrialRow.grid_id == grid_id).group_by(TrialRow.status)).all()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({status: n for status, n in rows})
        return counts

    def cancel_grid(self, grid_id: str) -> int:
        """Mark the grid cancelled and its queued trials cancelled; running ones are stopped by their owner."""
        with self.transaction() as s:
            s.get(GridRow, grid_id).cancelled = True
            keys = select(GridTrialRow.trial_key).where(GridTrialRow.grid_id == grid_id)
            res = s.execute(update(TrialRow).where(TrialRow.key.in_(keys), TrialRow.status == "queued")
                            .values(status="cancelled", updated_at=time.time()))
            return res.rowcount

    def is_cancelled(self, grid_id: str) -> bool:
        with self.snapshot() as s:
            return bool(s.scalar(select(GridRow.cancelled).where(GridRow.id == grid_id)))

    # ------------------------------------------------------------------------------------------ trials
    def claim(self, key: str, owner: str, stale_after: float = STALE_AFTER_S) -> bool:
        """Atomically take a queued trial (or one whose owner went silent) for `owner`."""
        return bool(self.claim_many([key], owner, stale_after))

    def claim_many(self, keys: Iterable[str], owner: str, stale_after: float = STALE_AFTER_S) -> list[str]:
        """Atomically take every trial of `keys` that is queued (or whose owner went silent) for `owner`, in one
        transaction of two statements; returns the keys taken. A trial another transaction holds locked at
        that instant (a concurrent claim) is not waited for: it counts as taken by someone else."""
        keys = sorted(set(keys))
        if not keys:
            return []
        now = time.time()
        with self.transaction() as s:
            # One conditional UPDATE over the rows it locks: PostgreSQL re-checks the condition of a row once
            # it holds it and skips rows another claim holds (so claims of overlapping sets never deadlock);
            # sqlite writes one transaction at a time.
            claimable = (select(TrialRow.key).where(
                TrialRow.key.in_(keys),
                (TrialRow.status == "queued") | ((TrialRow.status == "running") &
                                                 (TrialRow.heartbeat_at < now - stale_after)))
                .with_for_update(skip_locked=True))
            taken = sorted(s.scalars(update(TrialRow).where(TrialRow.key.in_(claimable.scalar_subquery()))
                                     .values(status="running", owner=owner, heartbeat_at=now,
                                             attempts=TrialRow.attempts + 1, updated_at=now)
                                     .returning(TrialRow.key)))
            if taken:
                s.execute(AttemptRow.__table__.insert(), [{"trial_key": k, "owner": owner, "started_at": now}
                                                          for k in taken])
            return taken

    def heartbeat(self, owner: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            with self.transaction() as s:
                s.execute(update(TrialRow).where(TrialRow.key.in_(keys), TrialRow.owner == owner,
                                                 TrialRow.status == "running").values(heartbeat_at=time.time()))

    def finish(self, key: str, owner: str, result: dict[str, Any]) -> bool:
        """Store a result once; False when this owner no longer holds the trial (nothing is written)."""
        return bool(self.finish_many(owner, {key: result}))

    def finish_many(self, owner: str, results: dict[str, dict[str, Any]]) -> list[str]:
        """Store the results of several trials in one transaction of three statements; returns the keys stored.
        A trial this owner no longer holds is left as it is."""
        for result in results.values():
            if result["status"] not in MEASURED:
                raise ValueError(f"a result's status is finished or diverged, not {result['status']!r}")
        if not results:
            return []
        now = time.time()
        open_attempt = (select(func.max(AttemptRow.id)).where(AttemptRow.trial_key == TrialRow.key,
                                                               AttemptRow.owner == owner, AttemptRow.ended_at.is_(None))
                        .scalar_subquery())
        with self.transaction() as s:
            held = s.execute(select(TrialRow.key, open_attempt).where(
                TrialRow.key.in_(sorted(results)), TrialRow.status == "running", TrialRow.owner == owner)
                .order_by(TrialRow.key).with_for_update(of=TrialRow)).all()
            if not held:
                return []
            trials, attempts = TrialRow.__table__, AttemptRow.__table__
            s.execute(update(trials).where(trials.c.key == bindparam("b_key")), [
                {"b_key": key, "status": results[key]["status"], "updated_at": now, "owner": None, "error": None,
                 "result": json.dumps({k: v for k, v in results[key].items() if k != "config"}),
                 **{f: results[key].get(f) for f in _RESULT_COLUMNS}} for key, _ in held])
            ended = [{"b_id": attempt, "ended_at": now, "outcome": results[key]["status"]}
                     for key, attempt in held if attempt is not None]
            if ended:
                s.execute(update(attempts).where(attempts.c.id == bindparam("b_id")), ended)
            return [key for key, _ in held]

    def fail(self, key: str, owner: str, error: str, max_retries: int) -> str:
        """Record a failed attempt: queued again while attempts remain, else `error`. Returns the new state."""
        with self.transaction() as s:
            row = s.get(TrialRow, key, with_for_update=True)
            if not _held(row, owner):
                return row.status if row is not None else "error"
            row.status = "queued" if row.attempts <= max_retries else "error"
            row.error, row.owner, row.updated_at = error[:4000], None, time.time()
            _end_attempt(s, key, owner, "error", error[:4000])
            return row.status

    def release(self, owner: str, keys: Iterable[str], status: str = "queued") -> None:
        """Hand running trials back (interrupt: queued, resumable; cancel: cancelled)."""
        with self.transaction() as s:
            for key in keys:
                row = s.get(TrialRow, key, with_for_update=True)
                if _held(row, owner):
                    row.status, row.owner, row.updated_at = status, None, time.time()
                    row.attempts = max(0, row.attempts - 1) if status == "queued" else row.attempts
                    _end_attempt(s, key, owner, status)

    def trial(self, key: str) -> TrialRow | None:
        with self.snapshot() as s:
            return s.get(TrialRow, key)

    def attempts(self, key: str) -> list[AttemptRow]:
        with self.snapshot() as s:
            return list(s.scalars(select(AttemptRow).where(AttemptRow.trial_key == key).order_by(AttemptRow.id)))

    # ----------------------------------------------------------------------------------- tuned recipes
    def save_tuned(self, record: dict[str, Any]) -> None:
        """Save a study's best recipe under `record["name"]` (replacing an earlier one of that name)."""
        with self.transaction() as s:
            s.merge(TunedRecipeRow(name=record["name"], study=record["study"], trial=record["trial"],
                                   value=record["value"], recipe=json.dumps(record["recipe"]),
                                   params=json.dumps(record["params"]), spec=json.dumps(record["spec"]),
                                   updated_at=time.time()))

    def tuned_records(self) -> list[dict[str, Any]]:
        """Every saved tuned recipe with its provenance (study, trial number, validation error, spec)."""
        with self.snapshot() as s:
            rows = list(s.scalars(select(TunedRecipeRow).order_by(TunedRecipeRow.name)))
        return [{"name": r.name, "study": r.study, "trial": r.trial, "value": r.value, "recipe": json.loads(r.recipe),
                 "params": json.loads(r.params), "spec": json.loads(r.spec), "updated_at": r.updated_at}
                for r in rows]

    def tuned_recipes(self) -> dict[str, dict[str, Any]]:
        """{name: recipe fields} for `expand_grid(spec, tuned=...)`, where a grid says `recipe: tuned/<name>`."""
        return {r["name"]: r["recipe"] for r in self.tuned_records()}

    # ------------------------------------------------------------------------------- sequential plans
    def sequential_plan(self, grid_id: str) -> dict[str, Any] | None:
        with self.snapshot() as s:
            row = s.get(SequentialPlanRow, grid_id)
            return None if row is None else json.loads(row.plan)

    def start_sequential(self, grid_id: str, plan: dict[str, Any]) -> dict[str, Any]:
        """Store the grid's plan unless it has one; returns the stored plan (the first one wins)."""
        try:
            with self.transaction() as s:
                if s.get(SequentialPlanRow, grid_id) is None:
                    s.add(SequentialPlanRow(grid_id=grid_id, plan=json.dumps(plan), created_at=time.time()))
        except IntegrityError:
            pass  # another process stored its plan between our read and write: that one stands
        return self.sequential_plan(grid_id)

    def record_look(self, grid_id: str, look: int, records: dict[tuple[str, int, str], dict[str, Any]]) -> bool:
        """Store one look's outcomes, all or nothing; False (nothing written) when the look is stored already."""
        now = time.time()
        try:
            with self.transaction() as s:
                if s.scalar(select(func.count()).select_from(SequentialLookRow).where(
                        SequentialLookRow.grid_id == grid_id, SequentialLookRow.look == look)):
                    return False
                for (dataset, depth, variant), record in records.items():
                    s.add(SequentialLookRow(grid_id=grid_id, look=look, dataset=dataset, depth=depth, variant=variant,
                                            created_at=now, **{k: record[k] for k in LOOK_FIELDS}))
        except IntegrityError:
            return False
        return True

    def sequential_looks(self, grid_id: str) -> list[dict[tuple[str, int, str], dict[str, Any]]]:
        """The stored looks in order, each: comparison (dataset, depth, variant) → its record."""
        with self.snapshot() as s:
            rows = list(s.scalars(select(SequentialLookRow).where(SequentialLookRow.grid_id == grid_id)
                                  .order_by(SequentialLookRow.look)))
        looks: dict[int, dict] = {}
        for r in rows:
            looks.setdefault(r.look, {})[(r.dataset, r.depth, r.variant)] = {k: getattr(r, k) for k in LOOK_FIELDS}
        return [looks[k] for k in sorted(looks)]


def _insert_new(s: Session, table, rows: list[dict[str, Any]]) -> None:
    """Insert the rows whose primary key is not there yet.

    On PostgreSQL as one statement over arrays (`INSERT … SELECT unnest(…) ON CONFLICT DO NOTHING`): psycopg2
    runs an executemany as a statement per row, and SQLAlchemy's batching does not take ON CONFLICT, which
    made recording a 10,000-trial grid take 3.4 s before its first trial could start (0.3 s this way)."""
    if not rows:
        return
    if s.get_bind().dialect.name != "postgresql":
        s.execute(sqlite.insert(table).on_conflict_do_nothing(), rows)  # sqlite3's executemany is one C loop
        return
    names = list(rows[0])
    columns = [func.unnest(bindparam(f"col_{i}", [r[n] for r in rows], type_=postgresql.ARRAY(table.c[n].type)))
               for i, n in enumerate(names)]
    s.execute(postgresql.insert(table).from_select(names, select(*columns)).on_conflict_do_nothing())


def _chunks(items: list, size: int = CHUNK):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _held(row: TrialRow | None, owner: str) -> bool:
    """Whether `owner` runs the trial now (read with its row locked: nobody takes it over meanwhile)."""
    return row is not None and row.status == "running" and row.owner == owner


def _end_attempt(s: Session, key: str, owner: str, outcome: str, error: str | None = None) -> None:
    attempt = s.scalars(select(AttemptRow).where(AttemptRow.trial_key == key, AttemptRow.owner == owner,
                                                 AttemptRow.ended_at.is_(None))
                        .order_by(AttemptRow.id.desc())).first()
    if attempt is not None:
        attempt.ended_at, attempt.outcome, attempt.error = time.time(), outcome, error
