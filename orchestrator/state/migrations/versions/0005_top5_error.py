"""Each trial's top-5 error, which ImageNet-style trials report beside the top-1 `test_error`.

The column is filled for trials that ended before this revision from their stored result records (only
records of ImageNet-style trials hold one: the column stays empty elsewhere).

Revision ID: 0005
Revises: 0004
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ablate_trials") as batch:
        batch.add_column(sa.Column("test_error_top5", sa.Float(), nullable=True))
    trials = sa.table("ablate_trials", sa.column("key", sa.String), sa.column("result", sa.Text),
                      sa.column("test_error_top5", sa.Float))
    bind = op.get_bind()
    for key, result in bind.execute(sa.select(trials.c.key, trials.c.result).where(trials.c.result.is_not(None))):
        top5 = json.loads(result).get("test_error_top5")
        if top5 is not None:
            bind.execute(trials.update().where(trials.c.key == key).values(test_error_top5=top5))


def downgrade() -> None:
    with op.batch_alter_table("ablate_trials") as batch:
        batch.drop_column("test_error_top5")
