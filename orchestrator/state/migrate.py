"""Bring a state database to the newest schema revision when a store opens it (Alembic, migrations/).

Three kinds of database arrive here: a new one (no tables: every revision runs), one from a release before
migrations (Ablate's tables, no version table: stamped at the baseline its tables already match, then
upgraded) and one already under Alembic (upgraded if behind). A database at a revision this Ablate does
not know was written by a newer Ablate: refused, never touched.

Everything happens in one transaction under a lock (see `sql.DIALECTS`), so processes opening the same
new database at once create its tables once, and a crash mid-upgrade leaves the previous schema.
"""
from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, inspect, select

from .base import StateError
from .models import TABLE_PREFIX, VERSION_TABLE, Meta

MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"
PRE_MIGRATIONS_SCHEMA_VERSION = 1  # what releases before migrations wrote in ablate_meta


def include_name(name: str | None, type_: str, parent_names) -> bool:
    """Alembic looks at Ablate's tables only: Optuna's share the database and migrate themselves."""
    return type_ != "table" or name.startswith(TABLE_PREFIX)


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    return _scripts().get_current_head()


def upgrade(conn: Connection, where: str, target: str = "head") -> None:
    """Upgrade the database behind `conn` (in a transaction holding the migration lock) to the head (or to
    `target`, for tests of one revision)."""
    current = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_heads()
    if current == (head(),):
        return
    for revision in current:
        try:
            _scripts().get_revision(revision)
        except CommandError:
            raise StateError(f"state database {where} has schema revision {revision}, newer than this "
                             f"Ablate's {head()}: upgrade Ablate") from None
    config = _config(conn)
    if not current and inspect(conn).has_table(Meta.__tablename__):
        version = conn.scalar(select(Meta.value).where(Meta.key == "schema_version"))
        if version is not None and int(version) > PRE_MIGRATIONS_SCHEMA_VERSION:
            raise StateError(f"state database {where} has schema {version}, newer than this Ablate's: "
                             f"upgrade Ablate")
        command.stamp(config, BASELINE)
    command.upgrade(config, target)
