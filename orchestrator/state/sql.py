"""The state store on a SQL database through SQLAlchemy: sqlite (the embedded default) or PostgreSQL.

The two differ only in how they keep `BaseStateStore`'s contract, written down as data in `DIALECTS`:
sqlite has one writer at a time and takes its write lock when a transaction begins; PostgreSQL locks rows
and takes an advisory lock while it migrates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from . import migrate
from .base import BaseStateStore, StateError

READ_ONLY = "ablate_read_only"  # execution option of the connections behind `snapshot`


def ablate_home() -> Path:
    return Path(os.environ.get("ABLATE_HOME", ".ablate")).resolve()


def default_state_url() -> str:
    return os.environ.get("ABLATE_STATE_URL") or f"sqlite:///{ablate_home() / 'state.db'}"


def sqlite_discipline(engine: Engine) -> None:
    """WAL (readers never block the writer), foreign keys, and write transactions that take the write lock
    when they begin (BEGIN IMMEDIATE): two processes that read-then-write never deadlock into
    SQLITE_BUSY, they queue on the busy timeout instead. Optuna's storage on the same file uses it too."""

    def connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # the "begin" listener below opens every transaction
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    def begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    event.listen(engine, "connect", connect)
    event.listen(engine, "begin", begin)


@dataclass(frozen=True)
class Dialect:
    engine_options: dict[str, Any]
    setup: Callable[[Engine], None] = lambda engine: None
    # Serialises schema upgrades of one database (sqlite's write lock already does).
    migration_lock: str | None = None


DIALECTS = {
    "sqlite": Dialect({"connect_args": {"timeout": 60}}, sqlite_discipline),
    "postgresql": Dialect({"pool_pre_ping": True},
                          migration_lock="SELECT pg_advisory_xact_lock(7161377026364744001)"),
}


def dialect_of(url: str) -> Dialect:
    name = make_url(url).get_backend_name()
    if name not in DIALECTS:
        raise StateError(f"state database {safe_url(url)}: {name} is not supported; "
                         f"use {' or '.join(DIALECTS)}")
    return DIALECTS[name]


def safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def open_engine(url: str | None = None) -> Engine:
    """An engine on the state database with its dialect's discipline (no schema check: see StateStore)."""
    url = url or default_state_url()
    dialect = dialect_of(url)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **dialect.engine_options)
    dialect.setup(engine)
    return engine


class StateStore(BaseStateStore):
    """The store on the database at `url` (default: $ABLATE_STATE_URL, else sqlite under $ABLATE_HOME).

    Opening it upgrades the database's schema to this release's (migrate.py) or refuses a newer one.
    """

    def __init__(self, url: str | None = None):
        self._url = url or default_state_url()
        dialect = dialect_of(self._url)
        self.engine = open_engine(self._url)
        self._writes = sessionmaker(self.engine, expire_on_commit=False)
        self._reads = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)
        with self.engine.begin() as conn:
            if dialect.migration_lock:
                conn.execute(text(dialect.migration_lock))
            migrate.upgrade(conn, safe_url(self._url))

    @property
    def url(self) -> str:
        return self._url

    def transaction(self):
        return self._writes.begin()

    def snapshot(self) -> Session:
        return self._reads()


def get_store(store: BaseStateStore | str | None = None) -> BaseStateStore:
    """The one place loose input becomes a store: a store as it is, a URL, or None for the default."""
    return store if isinstance(store, BaseStateStore) else StateStore(store)
