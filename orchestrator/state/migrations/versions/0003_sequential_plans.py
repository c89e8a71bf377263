"""Sequential plans and their looks (`ablate run --until-decided`); each trial's test-set size and precision.

The two trial columns are filled for trials that ended before this revision from their stored result
records (records from before they were written hold neither: the columns stay empty there).

Revision ID: 0003
Revises: 0002
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ablate_trials") as batch:
        batch.add_column(sa.Column("test_size", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("precision", sa.String(8), nullable=True))
    trials = sa.table("ablate_trials", sa.column("key", sa.String), sa.column("result", sa.Text),
                      sa.column("test_size", sa.Integer), sa.column("precision", sa.String))
    bind = op.get_bind()
    for key, result in bind.execute(sa.select(trials.c.key, trials.c.result).where(trials.c.result.is_not(None))):
        record = json.loads(result)
        if record.get("test_size") is not None or record.get("precision") is not None:
            bind.execute(trials.update().where(trials.c.key == key)
                         .values(test_size=record.get("test_size"), precision=record.get("precision")))
    op.create_table(
        "ablate_sequential_plans",
        sa.Column("grid_id", sa.String(100), sa.ForeignKey("ablate_grids.id"), primary_key=True),
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False))
    op.create_table(
        "ablate_sequential_looks",
        sa.Column("grid_id", sa.String(100), sa.ForeignKey("ablate_grids.id"), primary_key=True),
        sa.Column("look", sa.Integer(), primary_key=True),
        sa.Column("dataset", sa.String(32), primary_key=True),
        sa.Column("depth", sa.Integer(), primary_key=True),
        sa.Column("variant", sa.String(64), primary_key=True),
        sa.Column("n", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Float(), nullable=True) for name in
          ("delta", "sd", "p_value", "level", "share", "alpha_spent", "ci_low", "ci_high")),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("stopped", sa.String(16), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False))


def downgrade() -> None:
    op.drop_table("ablate_sequential_looks")
    op.drop_table("ablate_sequential_plans")
    with op.batch_alter_table("ablate_trials") as batch:
        batch.drop_column("precision")
        batch.drop_column("test_size")
