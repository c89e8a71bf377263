"""What a study is: the tuning spec (schema in shared/CONTRACT.md, "Tuning specification") and the
structure of its search space, checked field by field with one-line errors before anything runs."""
from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ablations.spec import CatalogueVariant, load_yaml, spec_text, validate_mapping, variant_fields
from ablations.vocabulary import DataDir, DatasetName, Subset, excerpt

from ..grids import NAME_PATTERN, Resources, VariantSpec

# Recipe fields a space may tune, with the type their bounds must have. `milestone_fractions` is the
# schedule's shape: choices of lists of fractions of the run, e.g. [[0.5, 0.75], [0.25, 0.5, 0.75], []];
# a list, because the number of drops is a choice too and sorted pairs of floats would confuse TPE.
TUNABLE: dict[str, type] = {"lr": float, "warmup_lr": float, "weight_decay": float, "momentum": float,
                            "warmup_iterations": int, "milestone_fractions": list}


class TuneError(ValueError):
    """A study that cannot run: one line with the field and the reason."""


def first_line(exc: BaseException, limit: int = 2000) -> str:
    """An exception in one line (its last): what a trial's record and the console show."""
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:limit]


class TuneSpec(BaseModel):
    """Schema in shared/CONTRACT.md ("Tuning specification")."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    dataset: DatasetName
    subset: Subset | None = None
    data_dir: DataDir | None = Field(None, description="datasets root on every node, as in a grid")
    depth: int = Field(ge=1)
    block: Literal["basic", "bottleneck"] | None = None
    width: int | None = Field(None, ge=1, le=1024)
    variant: CatalogueVariant | VariantSpec = "original"
    base: str | dict[str, Any] = "mini-cpu"
    space: dict[str, dict[str, Any]]
    n_trials: int = Field(20, ge=1, le=10_000)
    pruner: Literal["median", "hyperband", "none"] = "median"
    validation: float = Field(0.1, gt=0.0, lt=1.0, description="held-out fraction of the training set")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    parallel: int | None = Field(None, ge=1, le=1024, description="default: Ray CPUs (or GPUs) / resources")
    resources: Resources = Resources()

    @field_validator("space")
    @classmethod
    def _space(cls, value):
        if not value:
            raise TuneError(f"space: give at least one field to tune: {', '.join(TUNABLE)}")
        for field, entry in value.items():
            _check_entry(field, entry)
        return value

    def network_fields(self) -> dict[str, Any]:
        fields = variant_fields(self.variant) if isinstance(self.variant, str) else self.variant.fields()
        own = {k: v for k, v in (("block", self.block), ("width", self.width)) if v is not None}
        return {**fields, **own, "depth": self.depth}

    def identity(self) -> dict[str, Any]:
        """What makes two runs the same study: trials under other values would not be comparable."""
        return self.model_dump(mode="json", by_alias=True, include={
            "dataset", "subset", "depth", "block", "width", "variant", "base", "space", "validation", "seed"})


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_entry(field: str, entry: Any) -> None:
    """Structure of one search-space entry (ranges against the recipe are checked in `search_space`)."""
    where = f"space.{field}"
    if field not in TUNABLE:
        raise TuneError(f"{where}: not a tunable field; tunable: {', '.join(TUNABLE)}")
    kind = TUNABLE[field]
    if not isinstance(entry, dict):
        raise TuneError(f"{where}: write {{low, high, log}} or {{choices: [...]}}, got {excerpt(entry)}")
    if "choices" in entry:
        if set(entry) != {"choices"}:
            raise TuneError(f"{where}: choices go alone, without {', '.join(sorted(set(entry) - {'choices'}))}")
        choices = entry["choices"]
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"{where}: choices must be a non-empty list, got {excerpt(choices)}")
        for c in choices:
            _check_value(where, kind, c)
        if len({encode_choice(c) for c in choices}) != len(choices):
            raise TuneError(f"{where}: choices repeat: {excerpt(choices)}")
        return
    if kind is list:
        raise TuneError(f"{where}: the schedule's shape is a choice: {{choices: [[0.5, 0.75], [0.3, 0.6, 0.9]]}}")
    unknown = set(entry) - {"low", "high", "log"}
    if unknown:
        raise TuneError(f"{where}: unknown key {excerpt(sorted(unknown)[0])}; write {{low, high, log}} or {{choices}}")
    if "low" not in entry or "high" not in entry:
        raise TuneError(f"{where}: a range needs both low and high, got {excerpt(entry)}")
    low, high, log = entry["low"], entry["high"], entry.get("log", False)
    for v in (low, high):
        _check_value(where, kind, v)
    if not isinstance(log, bool):
        raise TuneError(f"{where}: log is true or false, got {excerpt(log)}")
    if not low < high:
        raise TuneError(f"{where}: low ({excerpt(low)}) must be below high ({excerpt(high)})")
    if log and low <= 0:
        raise TuneError(f"{where}: a log scale needs low > 0, got {excerpt(low)}")


def _check_value(where: str, kind: type, value: Any) -> None:
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise TuneError(f"{where}: an integer field takes integer values, got {excerpt(value)}")
    if kind is float and not _is_number(value):
        raise TuneError(f"{where}: expects numbers, got {excerpt(value)}")
    if kind is list:
        if not isinstance(value, list) or not all(_is_number(f) and 0 < f < 1 for f in value):
            raise TuneError(f"{where}: each choice is a list of fractions of the run in (0, 1), got {excerpt(value)}")
        if value != sorted(set(value)):
            raise TuneError(f"{where}: fractions must be strictly increasing, got {excerpt(value)}")


def encode_choice(value: Any) -> Any:
    """Optuna's categorical choices are scalars: a milestone list becomes '0.5,0.75' ('none' for [])."""
    if isinstance(value, list):
        return ",".join(f"{f:g}" for f in value) or "none"
    return value


def decode_param(field: str, value: Any) -> Any:
    if field == "milestone_fractions":
        return [] if value == "none" else [float(f) for f in value.split(",")]
    return value


def parse_tune_spec(data: Any) -> TuneSpec:
    return validate_mapping(TuneSpec, data, TuneError, "tune spec", "name, dataset, depth, space, n_trials, …")


def load_tune_spec(source: str | os.PathLike | dict) -> TuneSpec:
    """A YAML/JSON file, YAML/JSON text, or an already parsed mapping."""
    if isinstance(source, dict):
        return parse_tune_spec(source)
    return parse_tune_spec(load_yaml(spec_text(str(source), TuneError, "tuning spec"), TuneError, "tuning spec"))

