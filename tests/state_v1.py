"""A frozen copy of the state schema Ablate created before migrations (`create_all` in orchestrator/state.py and
orchestrator/tuning.py as of commit d0ca4b7), to make databases as those releases left them. Never edit it:
tests/test_state.py checks that the baseline revision matches it and that such databases upgrade in place."""
from __future__ import annotations

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


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


class GridTrialRow(Base):
    __tablename__ = "ablate_grid_trials"
    grid_id: Mapped[str] = mapped_column(ForeignKey("ablate_grids.id"), primary_key=True)
    trial_key: Mapped[str] = mapped_column(ForeignKey("ablate_trials.key"), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(32))
    depth: Mapped[int] = mapped_column(Integer)
    variant: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # True once the child run holds every metric of the result and is terminated.
    mlflow_synced: Mapped[bool] = mapped_column(Boolean, default=False)


class AttemptRow(Base):
    __tablename__ = "ablate_attempts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_key: Mapped[str] = mapped_column(ForeignKey("ablate_trials.key"), index=True)
    owner: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class _TuningBase(DeclarativeBase):  # tuning created its table on its own, on first use
    pass


class TunedRecipeRow(_TuningBase):
    __tablename__ = "ablate_tuned_recipes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    study: Mapped[str] = mapped_column(String(64))
    trial: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    recipe: Mapped[str] = mapped_column(Text)  # every Recipe field, JSON
    params: Mapped[str] = mapped_column(Text)
    spec: Mapped[str] = mapped_column(Text)  # what it was tuned for: dataset, depth, variant, space, …
    updated_at: Mapped[float] = mapped_column(Float)


def create(url: str, tuned: bool = False):
    """A database as a release before migrations made it (with tuning's table too when `tuned`)."""
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    if tuned:
        _TuningBase.metadata.create_all(engine)
    with Session(engine) as s, s.begin():
        s.add(Meta(key="schema_version", value="1"))
    return engine
