"""Alembic's entry point: migrates Ablate's tables only (Optuna's, in the same database, have their own)."""
from alembic import context

from orchestrator.state.migrate import include_name
from orchestrator.state.models import VERSION_TABLE, Base


def run(connection) -> None:
    # Batch mode: sqlite cannot alter most of a table in place; Alembic copies it instead.
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      include_name=include_name, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:  # a store opening its database (migrate.py), inside its locked transaction
    run(connection)
else:  # the alembic command line, on $ABLATE_STATE_URL
    from orchestrator.state.sql import open_engine
    with open_engine().begin() as conn:
        run(conn)
