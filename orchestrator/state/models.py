"""Ablate's tables. The schema itself is managed by the migrations beside this file (migrations/).

Every table is prefixed `ablate_`: Optuna's studies share the database with tables of their own (and their
own Alembic history in `alembic_version`), which Ablate's migrations never touch.
"""
from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TABLE_PREFIX = "ablate_"
# Not Alembic's default `alembic_version`: Optuna's storage keeps its own revision there.
VERSION_TABLE = "ablate_alembic_version"


class Base(DeclarativeBase):
    pass


class Meta(Base):
    """`schema_version`: the guard of Ablate releases from before migrations, which refuse a database whose
    value is above theirs (1). A revision that such a release would misread raises it."""
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
    # Top-5 error %, which ImageNet-style trials report beside the top-1 `test_error`.
    test_error_top5: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Images the test error was measured on (its binomial sampling error) and the precision it trained in.
    test_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    precision: Mapped[str | None] = mapped_column(String(8), nullable=True)
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


class TunedRecipeRow(Base):
    """The best recipe of a study, under the study's name; rewritten when the study finds a better one."""
    __tablename__ = "ablate_tuned_recipes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    study: Mapped[str] = mapped_column(String(64))
    trial: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    recipe: Mapped[str] = mapped_column(Text)  # every Recipe field, JSON
    params: Mapped[str] = mapped_column(Text)
    spec: Mapped[str] = mapped_column(Text)  # what it was tuned for: dataset, depth, variant, space, …
    updated_at: Mapped[float] = mapped_column(Float)


class SequentialPlanRow(Base):
    """The plan a grid's comparisons are decided by with `ablate run --until-decided` (dashboards.sequential.Plan
    as JSON: looks, seeds, α, β, margin, spending, baseline, metric). Written once, before the first look."""
    __tablename__ = "ablate_sequential_plans"
    grid_id: Mapped[str] = mapped_column(ForeignKey("ablate_grids.id"), primary_key=True)
    plan: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class SequentialLookRow(Base):
    """One comparison's outcome at one look of its grid's plan. Written once: a rerun goes on from the
    stored looks and never tests (nor spends α on) the same look again."""
    __tablename__ = "ablate_sequential_looks"
    grid_id: Mapped[str] = mapped_column(ForeignKey("ablate_grids.id"), primary_key=True)
    look: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset: Mapped[str] = mapped_column(String(32), primary_key=True)
    depth: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant: Mapped[str] = mapped_column(String(64), primary_key=True)
    n: Mapped[int] = mapped_column(Integer)                      # pairs at this look
    delta: Mapped[float | None] = mapped_column(Float, nullable=True)
    sd: Mapped[float | None] = mapped_column(Float, nullable=True)
    p_value: Mapped[float | None] = mapped_column(Float, nullable=True)
    level: Mapped[float | None] = mapped_column(Float, nullable=True)        # the nominal threshold tested at
    share: Mapped[float | None] = mapped_column(Float, nullable=True)        # 1/j of α (Holm)
    alpha_spent: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_low: Mapped[float | None] = mapped_column(Float, nullable=True)
    ci_high: Mapped[float | None] = mapped_column(Float, nullable=True)
    decision: Mapped[str] = mapped_column(String(16))
    stopped: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None: the comparison goes on
    created_at: Mapped[float] = mapped_column(Float)


LOOK_FIELDS = ("n", "delta", "sd", "p_value", "level", "share", "alpha_spent", "ci_low", "ci_high", "decision",
               "stopped")
