"""One MLflow child run per trial: its run id and sync flag move from each grid's link to the trial itself.

A trial shared by several grids had a child run per grid; it keeps the run of the grid that was registered
first (the one the others reused it from), and that run's sync flag. The grids' parent runs stay as they
are (`ablate_grids.mlflow_run_id`), now shared by the grids of one name. Releases from before migrations
read the dropped columns: `schema_version` 2 makes them refuse the database rather than misread it.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

grids = sa.table("ablate_grids", sa.column("id", sa.String), sa.column("created_at", sa.Float))
links = sa.table("ablate_grid_trials", sa.column("grid_id", sa.String), sa.column("trial_key", sa.String),
                 sa.column("mlflow_run_id", sa.String), sa.column("mlflow_synced", sa.Boolean))
trials = sa.table("ablate_trials", sa.column("key", sa.String), sa.column("mlflow_run_id", sa.String),
                  sa.column("mlflow_synced", sa.Boolean))
meta = sa.table("ablate_meta", sa.column("key", sa.String), sa.column("value", sa.Text))


def upgrade() -> None:
    with op.batch_alter_table("ablate_trials") as batch:
        batch.add_column(sa.Column("mlflow_run_id", sa.String(64), nullable=True))
        # A literal default: sqlite adds the column in place (an expression would make Alembic copy the
        # table, which other tables' foreign keys refer to).
        batch.add_column(sa.Column("mlflow_synced", sa.Boolean(), nullable=False, server_default="0"))
    bind = op.get_bind()
    held = bind.execute(sa.select(links.c.trial_key, links.c.mlflow_run_id, links.c.mlflow_synced)
                        .join(grids, grids.c.id == links.c.grid_id).where(links.c.mlflow_run_id.is_not(None))
                        .order_by(links.c.trial_key, grids.c.created_at))
    first: dict[str, tuple[str, bool]] = {}
    for key, run_id, synced in held:
        first.setdefault(key, (run_id, bool(synced)))
    for key, (run_id, synced) in first.items():
        bind.execute(trials.update().where(trials.c.key == key).values(mlflow_run_id=run_id, mlflow_synced=synced))
    with op.batch_alter_table("ablate_grid_trials") as batch:
        batch.drop_column("mlflow_synced")
        batch.drop_column("mlflow_run_id")
    bind.execute(meta.update().where(meta.c.key == "schema_version").values(value="2"))


def downgrade() -> None:
    with op.batch_alter_table("ablate_grid_trials") as batch:
        batch.add_column(sa.Column("mlflow_run_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("mlflow_synced", sa.Boolean(), nullable=False, server_default="0"))
    bind = op.get_bind()
    for key, run_id, synced in bind.execute(sa.select(trials.c.key, trials.c.mlflow_run_id, trials.c.mlflow_synced)
                                            .where(trials.c.mlflow_run_id.is_not(None))):
        bind.execute(links.update().where(links.c.trial_key == key).values(mlflow_run_id=run_id, mlflow_synced=synced))
    with op.batch_alter_table("ablate_trials") as batch:
        batch.drop_column("mlflow_synced")
        batch.drop_column("mlflow_run_id")
    bind.execute(meta.update().where(meta.c.key == "schema_version").values(value="1"))
