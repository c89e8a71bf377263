"""Baseline: the schema Ablate created with `create_all` before it had migrations (schema_version 1).

A database made by those releases has these tables and no `ablate_alembic_version`: opening it stamps
it at this revision instead of running it (migrate.py).

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "ablate_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False))
    op.create_table(
        "ablate_grids",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("cancelled", sa.Boolean(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True))
    op.create_index("ix_ablate_grids_name", "ablate_grids", ["name"])
    op.create_table(
        "ablate_trials",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(100), nullable=True),
        sa.Column("heartbeat_at", sa.Float(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("test_error", sa.Float(), nullable=True),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("train_error", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False))
    op.create_index("ix_ablate_trials_status", "ablate_trials", ["status"])
    op.create_table(
        "ablate_grid_trials",
        sa.Column("grid_id", sa.String(100), sa.ForeignKey("ablate_grids.id"), primary_key=True),
        sa.Column("trial_key", sa.String(64), sa.ForeignKey("ablate_trials.key"), primary_key=True),
        sa.Column("dataset", sa.String(32), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("mlflow_run_id", sa.String(64), nullable=True),
        sa.Column("mlflow_synced", sa.Boolean(), nullable=False))
    op.create_table(
        "ablate_attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("trial_key", sa.String(64), sa.ForeignKey("ablate_trials.key"), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("error", sa.Text(), nullable=True))
    op.create_index("ix_ablate_attempts_trial_key", "ablate_attempts", ["trial_key"])
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])


def downgrade() -> None:
    for table in ("ablate_attempts", "ablate_grid_trials", "ablate_trials", "ablate_grids", "ablate_meta"):
        op.drop_table(table)
