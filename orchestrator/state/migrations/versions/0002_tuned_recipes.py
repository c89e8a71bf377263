"""Tuned recipes join the store's schema.

Tuning used to create `ablate_tuned_recipes` itself on first use, so a database from before migrations
may hold it already (same columns): it is created only where it is missing.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("ablate_tuned_recipes"):
        return
    op.create_table(
        "ablate_tuned_recipes",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("study", sa.String(64), nullable=False),
        sa.Column("trial", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("recipe", sa.Text(), nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("spec", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False))


def downgrade() -> None:
    op.drop_table("ablate_tuned_recipes")
