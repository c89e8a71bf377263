"""Persistent state: grids, trials, attempts and results in one SQL database (SQLAlchemy).

sqlite under $ABLATE_HOME by default, any SQLAlchemy URL through ABLATE_STATE_URL (Postgres in the
deployment). Every transition is one transaction, so a crash at any instant leaves a consistent state.

Invariants the rest of Ablate relies on:
- a trial row is keyed by its content hash and shared by every grid that contains it;
- a trial that is `finished` or `diverged` is immutable: nothing rewrites its result;
- a trial runs only after `claim` succeeded, which is atomic across processes: a `running` trial belongs
  to one owner, and only an owner whose heartbeat went stale loses it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import (Boolean, Float, ForeignKey, Integer, String, Text, create_engine, event, func, select,
                        update)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

SCHEMA_VERSION = 1
STATES = ("queued", "running", "finished", "diverged", "error", "cancelled")
DONE = ("finished", "diverged")
# A running trial whose owner stopped heartbeating this long is taken over (owners beat 4× as often).
STALE_AFTER_S = float(os.environ.get("ABLATE_STALE_AFTER_S", "30"))


class StateError(RuntimeError):
    """The state database cannot be used (newer schema, unreachable)."""


class Base(DeclarativeBase):
    """Ablate's tables, all prefixed `ablate_`: Optuna's studies share this database (its `trials` table)."""


class Meta(Base):
    __tablename__ = "ablate_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class GridRow(Base):
    __tablename__ = "ablate_grids"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    spec: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)
    # The MLflow parent run: one per grid name, so every grid of a name (grown with more seeds, depths or
    # variants) holds the same id.
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class TrialRow(Base):
    __tablename__ = "ablate_trials"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    config: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)
    test_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    train_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    # One MLflow child run per trial, under the parent of the grid that first ran it; other grids link to it.
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # True once the child run holds every metric of the result and is terminated.
    mlflow_synced: Mapped[bool] = mapped_column(Boolean, default=False)


class GridTrialRow(Base):
    __tablename__ = "ablate_grid_trials"
    grid_id: Mapped[str] = mapped_column(ForeignKey("ablate_grids.id"), primary_key=True)
    trial_key: Mapped[str] = mapped_column(ForeignKey("ablate_trials.key"), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(32))
    depth: Mapped[int] = mapped_column(Integer)
    variant: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)


class AttemptRow(Base):
    __tablename__ = "ablate_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_key: Mapped[str] = mapped_column(ForeignKey("ablate_trials.key"), index=True)
    owner: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


def ablate_home() -> Path:
    return Path(os.environ.get("ABLATE_HOME", ".ablate")).resolve()


def default_state_url() -> str:
    return os.environ.get("ABLATE_STATE_URL") or f"sqlite:///{ablate_home() / 'state.db'}"


def _sqlite_pragmas(dbapi_conn, _record):
    dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event below opens every transaction
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class StateStore:
    """Thread-safe (one session per call). Safe for several processes on one database."""

    def __init__(self, url: str | None = None):
        self.url = url or default_state_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(self.url, connect_args={"timeout": 60})
            event.listen(self.engine, "connect", _sqlite_pragmas)
            # BEGIN IMMEDIATE takes the write lock up front: two processes that read-then-write never
            # deadlock into SQLITE_BUSY, they queue on the busy timeout instead.
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._migrate()

    def _migrate(self) -> None:
        Base.metadata.create_all(self.engine)
        with self.sessions.begin() as s:
            row = s.get(Meta, "schema_version")
            if row is None:
                s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row.value) > SCHEMA_VERSION:
                raise StateError(f"state database {self.url} has schema {row.value}, newer than this "
                                 f"Ablate's {SCHEMA_VERSION}: upgrade Ablate")

    # ------------------------------------------------------------------------------------------- grids
    def register_grid(self, grid_id: str, name: str, spec: dict, trials: Iterable[Any]) -> None:
        """Record the grid and its trials; trials that ended in error or were cancelled are queued again."""
        now = time.time()
        with self.sessions.begin() as s:
            grid = s.get(GridRow, grid_id)
            if grid is None:
                s.add(GridRow(id=grid_id, name=name, spec=json.dumps(spec), created_at=now, cancelled=False))
            else:
                # Same id, same trials; presentation fields (paper_setting) may have changed: keep the latest.
                grid.cancelled, grid.spec = False, json.dumps(spec)
            trials = list(trials)
            keys = list({t.key for t in trials})
            rows: dict[str, TrialRow] = {}
            for i in range(0, len(keys), 500):  # a few queries, not two per trial
                rows.update({r.key: r for r in s.scalars(select(TrialRow).where(TrialRow.key.in_(keys[i:i + 500])))})
            linked = set(s.scalars(select(GridTrialRow.trial_key).where(GridTrialRow.grid_id == grid_id)))
            for t in trials:
                row = rows.get(t.key)
                if row is None:
                    rows[t.key] = TrialRow(key=t.key, config=t.config.model_dump_json(), status="queued", attempts=0,
                                           updated_at=now)
                    s.add(rows[t.key])
                elif row.status in ("error", "cancelled"):
                    # Its child run (if any) is brought up to date again when it ends.
                    row.status, row.attempts, row.error, row.updated_at = "queued", 0, None, now
                    row.mlflow_synced = False
            s.flush()  # grid and trial rows first: the links below refer to them
            for t in trials:
                if t.key not in linked:
                    linked.add(t.key)
                    s.add(GridTrialRow(grid_id=grid_id, trial_key=t.key, dataset=t.dataset, depth=t.depth,
                                       variant=t.variant, seed=t.seed))

    def grid(self, grid_id: str) -> GridRow | None:
        with self.sessions() as s:
            return s.get(GridRow, grid_id)

    def grids(self) -> list[GridRow]:
        with self.sessions() as s:
            return list(s.scalars(select(GridRow).order_by(GridRow.created_at)))

    def find_grid(self, ref: str) -> GridRow | None:
        """A grid by id, or the newest grid of that name."""
        with self.sessions() as s:
            row = s.get(GridRow, ref)
            if row is None:
                row = s.scalars(select(GridRow).where(GridRow.name == ref)
                                .order_by(GridRow.created_at.desc())).first()
            return row

    def grid_run(self, grid_id: str) -> str | None:
        """The grid's MLflow parent run: its own, else the one an earlier grid of the same name holds
        (which the grid then holds too)."""
        held = self.grid(grid_id).mlflow_run_id
        if held is not None:
            return held  # the common case: read only, no write lock
        with self.sessions.begin() as s:
            grid = s.get(GridRow, grid_id)
            if grid.mlflow_run_id is None:
                grid.mlflow_run_id = s.scalars(select(GridRow.mlflow_run_id).where(
                    GridRow.name == grid.name, GridRow.mlflow_run_id.is_not(None))
                    .order_by(GridRow.created_at.desc())).first()
            return grid.mlflow_run_id

    def run_grids(self, run_id: str) -> list[str]:
        """The ids of the grids an MLflow parent run has held, oldest first."""
        with self.sessions() as s:
            return list(s.scalars(select(GridRow.id).where(GridRow.mlflow_run_id == run_id)
                                  .order_by(GridRow.created_at)))

    def set_grid_run(self, grid_id: str, run_id: str) -> None:
        with self.sessions.begin() as s:
            s.get(GridRow, grid_id).mlflow_run_id = run_id

    def set_trial_run(self, key: str, run_id: str) -> str:
        """Give a trial its MLflow child run unless it holds one already; returns the run it holds (the first
        saved wins when two drivers made one at once)."""
        with self.sessions.begin() as s:
            s.execute(update(TrialRow).where(TrialRow.key == key, TrialRow.mlflow_run_id.is_(None))
                      .values(mlflow_run_id=run_id))
            return s.scalar(select(TrialRow.mlflow_run_id).where(TrialRow.key == key))

    def set_trial_synced(self, key: str) -> None:
        with self.sessions.begin() as s:
            s.get(TrialRow, key).mlflow_synced = True

    def grid_trials(self, grid_id: str, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The grid's trials (or those of `keys`) with their labels, state and result."""
        query = (select(GridTrialRow, TrialRow).join(TrialRow, TrialRow.key == GridTrialRow.trial_key)
                 .where(GridTrialRow.grid_id == grid_id))
        if keys is not None:
            query = query.where(GridTrialRow.trial_key.in_(list(keys)))
        with self.sessions() as s:
            rows = s.execute(query).all()
        out = []
        for gt, t in rows:
            out.append({"key": t.key, "dataset": gt.dataset, "depth": gt.depth, "variant": gt.variant,
                        "seed": gt.seed, "status": t.status, "attempts": t.attempts, "test_error": t.test_error,
                        "train_loss": t.train_loss, "error": t.error, "mlflow_run_id": t.mlflow_run_id,
                        "mlflow_synced": t.mlflow_synced,
                        "result": json.loads(t.result) if t.result else None, "config": t.config})
        return out

    def results_table(self, grid_id: str):
        """The grid's results as a pyarrow Table in one query: the fast read path of the tables."""
        import pyarrow as pa
        query = (select(GridTrialRow.dataset, GridTrialRow.depth, GridTrialRow.variant, GridTrialRow.seed,
                        TrialRow.status, TrialRow.test_error, TrialRow.train_loss, TrialRow.train_error)
                 .join(TrialRow, TrialRow.key == GridTrialRow.trial_key).where(GridTrialRow.grid_id == grid_id)
                 # A fixed order: the bootstrap resamples by position, so the same results give the same CI.
                 .order_by(GridTrialRow.dataset, GridTrialRow.depth, GridTrialRow.variant, GridTrialRow.seed))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        names = ["dataset", "depth", "variant", "seed", "status", "test_error", "train_loss", "train_error"]
        return pa.table({name: [r[i] for r in rows] for i, name in enumerate(names)})

    def counts(self, grid_id: str) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(select(TrialRow.status, func.count()).join(
                GridTrialRow, TrialRow.key == GridTrialRow.trial_key)
                .where(GridTrialRow.grid_id == grid_id).group_by(TrialRow.status)).all()
        counts = dict.fromkeys(STATES, 0)
        counts.update({status: n for status, n in rows})
        return counts

    def cancel_grid(self, grid_id: str) -> int:
        """Mark the grid cancelled and its queued trials cancelled; running ones are stopped by their owner."""
        now = time.time()
        with self.sessions.begin() as s:
            s.get(GridRow, grid_id).cancelled = True
            keys = select(GridTrialRow.trial_key).where(GridTrialRow.grid_id == grid_id)
            res = s.execute(update(TrialRow).where(TrialRow.key.in_(keys), TrialRow.status == "queued")
                            .values(status="cancelled", updated_at=now))
            return res.rowcount

    def is_cancelled(self, grid_id: str) -> bool:
        with self.sessions() as s:
            return bool(s.scalar(select(GridRow.cancelled).where(GridRow.id == grid_id)))

    # ------------------------------------------------------------------------------------------ trials
    def claim(self, key: str, owner: str, stale_after: float = STALE_AFTER_S) -> bool:
        """Atomically take a queued trial (or one whose owner went silent) for `owner`."""
        now = time.time()
        with self.sessions.begin() as s:
            res = s.execute(update(TrialRow).where(
                TrialRow.key == key,
                (TrialRow.status == "queued") | ((TrialRow.status == "running") &
                                                 (TrialRow.heartbeat_at < now - stale_after)))
                .values(status="running", owner=owner, heartbeat_at=now, attempts=TrialRow.attempts + 1,
                        updated_at=now))
            if res.rowcount != 1:
                return False
            s.add(AttemptRow(trial_key=key, owner=owner, started_at=now))
            return True

    def heartbeat(self, owner: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            with self.sessions.begin() as s:
                s.execute(update(TrialRow).where(TrialRow.key.in_(keys), TrialRow.owner == owner,
                                                 TrialRow.status == "running").values(heartbeat_at=time.time()))

    def _end_attempt(self, s: Session, key: str, owner: str, outcome: str, error: str | None = None) -> None:
        attempt = s.scalars(select(AttemptRow).where(AttemptRow.trial_key == key, AttemptRow.owner == owner,
                                                     AttemptRow.ended_at.is_(None))
                            .order_by(AttemptRow.id.desc())).first()
        if attempt is not None:
            attempt.ended_at, attempt.outcome, attempt.error = time.time(), outcome, error

    def finish(self, key: str, owner: str, result: dict[str, Any]) -> bool:
        """Store a result once; False when this owner no longer holds the trial (nothing is written)."""
        status = result["status"]
        if status not in DONE:
            raise ValueError(f"a result's status is finished or diverged, not {status!r}")
        record = {k: v for k, v in result.items() if k != "config"}
        with self.sessions.begin() as s:
            row = s.get(TrialRow, key, with_for_update=True)
            if row is None or row.status != "running" or row.owner != owner:
                return False
            row.status, row.result, row.updated_at = status, json.dumps(record), time.time()
            row.test_error, row.train_loss, row.train_error = (result.get("test_error"), result.get("train_loss"),
                                                               result.get("train_error"))
            row.owner, row.error = None, None
            self._end_attempt(s, key, owner, status)
            return True

    def fail(self, key: str, owner: str, error: str, max_retries: int) -> str:
        """Record a failed attempt: queued again while attempts remain, else `error`. Returns the new state."""
        with self.sessions.begin() as s:
            row = s.get(TrialRow, key, with_for_update=True)
            if row is None or row.status != "running" or row.owner != owner:
                return row.status if row else "error"
            row.status = "queued" if row.attempts <= max_retries else "error"
            row.error, row.owner, row.updated_at = error[:4000], None, time.time()
            self._end_attempt(s, key, owner, "error", error[:4000])
            return row.status

    def release(self, owner: str, keys: Iterable[str], status: str = "queued") -> None:
        """Hand running trials back (interrupt: queued, resumable; cancel: cancelled)."""
        keys = list(keys)
        with self.sessions.begin() as s:
            for key in keys:
                row = s.get(TrialRow, key)
                if row is not None and row.status == "running" and row.owner == owner:
                    row.status, row.owner, row.updated_at = status, None, time.time()
                    row.attempts = max(0, row.attempts - 1) if status == "queued" else row.attempts
                    self._end_attempt(s, key, owner, status)

    def trial(self, key: str) -> TrialRow | None:
        with self.sessions() as s:
            return s.get(TrialRow, key)

    def attempts(self, key: str) -> list[AttemptRow]:
        with self.sessions() as s:
            return list(s.scalars(select(AttemptRow).where(AttemptRow.trial_key == key).order_by(AttemptRow.id)))
