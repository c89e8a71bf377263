"""Grid specifications: the one place loose input (YAML, JSON, a preset name) becomes trials.

`load_grid` reads and validates; `expand_grid` resolves every (dataset, depth, variant, seed) into a
TrialConfig whose content hash is the trial's key. Errors are GridError with the field path and reason.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ablations.paper import GRIDS
from ablations.spec import (MODEL_FIELDS, CatalogueVariant, SpecError, dataset_model_fields, excerpt, load_yaml,
                            make_spec, omit_at_defaults, raise_one_line, spec_text, validate_mapping,
                            variant_fields)
from ablations.vocabulary import DATASET_SHAPES, DATASET_SIZES, DataDir, DatasetName, Subset

NAME_PATTERN = r"^[a-z0-9._-]{1,64}$"
DEFAULT_MAX_TRIALS = 5000


class GridError(ValueError):
    """A grid that cannot run: one line with the field path and the reason."""


class VariantSpec(BaseModel):
    """A variant written out in the grid: a name plus model fields (`from` starts at a catalogue entry)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME_PATTERN)
    base: str | None = Field(None, alias="from")
    unit: str | None = None
    shortcut: str | None = None
    shortcut_scale: float | None = None
    residual_scale: float | None = None
    gate_bias: float | None = None
    dropout: float | None = None
    downsample: Literal["A", "B"] | None = None
    recipe: str | dict[str, Any] | None = Field(
        None, description="this variant's own recipe (e.g. tuned/<name>) instead of the grid's: compares a "
        "default and a tuned schedule side by side, as two variants of one setting")

    def fields(self) -> dict[str, Any]:
        base = variant_fields(self.base) if self.base else {}
        own = self.model_dump(exclude={"name", "base", "recipe"}, exclude_none=True)
        return {**base, **own}


class Resources(BaseModel):
    """What one trial asks of the cluster: `cpu` and `gpu` for each of its `workers`. One worker is a Ray
    task; several are one Ray Train job whose ranks split each global batch (DistributedDataParallel)."""
    model_config = ConfigDict(extra="forbid")
    cpu: float = Field(1.0, gt=0, le=1024)
    gpu: float = Field(0.0, ge=0, le=64)
    workers: int = Field(1, ge=1, le=4096, description="processes (devices) one trial trains on")

    # Fields added after grid ids were first made, left out of the dump at their defaults.
    _later = omit_at_defaults("workers")

    @model_validator(mode="after")
    def _one_device_per_rank(self) -> "Resources":
        if self.workers > 1 and self.gpu not in (0, 1):
            raise ValueError(f"gpu must be 0 or 1 with several workers (one device per rank), got {self.gpu:g}")
        return self


class GridSpec(BaseModel):
    """Schema in shared/CONTRACT.md; `dataset` may also be a list (Table 3 spans CIFAR-10 and -100)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    dataset: DatasetName | list[DatasetName]
    subset: Subset | None = None
    data_dir: DataDir | None = Field(None, description="datasets root on every node; not part of trial identity")
    recipe: str | dict[str, Any] = "mini-cpu"
    depths: list[int] = Field(min_length=1)
    variants: list[CatalogueVariant | VariantSpec] = Field(min_length=1)
    seeds: int | list[int]
    baseline: str | None = None
    resources: Resources = Resources()
    block: Literal["basic", "bottleneck"] | None = None
    width: int | None = Field(None, ge=1, le=1024)
    timeout_s: float | None = Field(None, gt=0, description="per-trial wall-clock limit")
    max_retries: int = Field(2, ge=0, le=20, description="retries after an error, each resuming its checkpoint")
    paper_setting: tuple[Literal["cifar10", "cifar100"], int] | None = Field(
        None, description="[dataset, depth] of the paper's table this grid stands in for: its figures are shown "
        "beside the grid's own, labelled with that setting")
    precision: Literal["auto", "fp32", "bf16"] | None = Field(
        None, description="every variant's recipe precision (auto: bf16 where the device makes it faster); "
        "unset: each recipe's own")
    fuse_seeds: int = Field(1, ge=1, le=64, description="train up to this many seeds of a cell as one fused "
                            "network in one task (same results per seed within float tolerance)")

    @field_validator("dataset")
    @classmethod
    def _datasets(cls, value):
        names = [value] if isinstance(value, str) else value
        if not names:
            raise ValueError("at least one dataset")
        if len(set(names)) != len(names):
            raise ValueError("datasets repeat")
        return value

    @field_validator("paper_setting")
    @classmethod
    def _paper_setting(cls, value):
        from ablations.paper import PAPER_RESULTS
        if value is not None and not any(key[:2] == tuple(value) for key in PAPER_RESULTS):
            settings = sorted({f"[{d}, {n}]" for d, n, _ in PAPER_RESULTS})
            raise ValueError(f"the paper has no figures for {excerpt(list(value))}; it has: {', '.join(settings)}")
        return value

    @field_validator("depths")
    @classmethod
    def _depths(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"depths repeat: {excerpt(value)}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"seeds must be a positive count or a list, got {excerpt(value)}")
            if value > 10_000:
                raise ValueError(f"seeds count {excerpt(value)} is over 10000")
        else:
            if not value:
                raise ValueError("seeds list is empty")
            if any(s < 0 or s > 2**31 - 1 for s in value):
                raise ValueError("each seed must lie in 0..2^31-1")
            if len(set(value)) != len(value):
                raise ValueError(f"seeds repeat: {excerpt(value)}")
        return value

    @model_validator(mode="after")
    def _names(self) -> "GridSpec":
        names = self.variant_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names repeat: {', '.join(dup)}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {excerpt(self.baseline)} is not one of the variants: {', '.join(names)}")
        if self.fuse_seeds > 1 and self.resources.workers > 1:
            # Fusion fills one device with several small trials; several workers split one large trial.
            raise ValueError("fuse_seeds and resources.workers above 1 exclude each other: fusing fills one "
                             "device with several seeds, workers split one seed over several devices")
        return self

    def variant_names(self) -> list[str]:
        return [v if isinstance(v, str) else v.name for v in self.variants]

    def variant_map(self) -> dict[str, dict[str, Any]]:
        return {(v if isinstance(v, str) else v.name): (variant_fields(v) if isinstance(v, str) else v.fields())
                for v in self.variants}

    def variant_recipes(self) -> dict[str, str | dict[str, Any]]:
        """{variant: its recipe}: the grid's, unless the variant names its own."""
        return {(v if isinstance(v, str) else v.name): (v.recipe if isinstance(v, VariantSpec) and v.recipe
                                                         is not None else self.recipe) for v in self.variants}

    def tuned_names(self) -> set[str]:
        """The tuned recipes (`tuned/<name>`) this grid uses, as the grid's base or a variant's."""
        names = set()
        for recipe in self.variant_recipes().values():
            base = recipe if isinstance(recipe, str) else recipe.get("base", "")
            if isinstance(base, str) and base.startswith("tuned/"):
                names.add(base.removeprefix("tuned/"))
        return names

    @property
    def datasets(self) -> list[str]:
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.variant_names()[0]

    def grid_id(self, tuned: dict[str, dict[str, Any]] | None = None) -> str:
        """Name plus a hash of the content: the same spec is the same grid (rerunning resumes it).

        A grid using `tuned/<name>` hashes that recipe's fields too (from `tuned`): tuning again under the
        same name makes other trials, so another grid, never a mix of both in one table.
        """
        body = self.model_dump(mode="json", by_alias=True)
        names = self.tuned_names()
        if names:
            body["tuned"] = {name: (tuned or {}).get(name) for name in sorted(names)}
        body["seeds"] = self.seed_list
        body.pop("fuse_seeds")  # how the trials run, not which: the same grid either way
        body.pop("paper_setting")  # presentation only
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.name}-{digest}"


@dataclass(frozen=True)
class GridTrial:
    """One grid point: the labels this grid gives it, and the configuration that identifies it."""
    dataset: str
    depth: int
    variant: str
    seed: int
    config: Any  # workers.trainer.TrialConfig

    @functools.cached_property
    def key(self) -> str:
        """The configuration's hash, computed once (a 10,000-trial grid asks for it three times per trial)."""
        return self.config.key()


def parse_grid(data: Any) -> GridSpec:
    return validate_mapping(GridSpec, data, GridError, "grid", "name, dataset, depths, variants, seeds, …")


def load_grid(source: str | os.PathLike | dict) -> GridSpec:
    """A bundled preset name, a YAML/JSON file, YAML/JSON text, or an already parsed mapping."""
    if isinstance(source, dict):
        return parse_grid(source)
    text = str(source)
    if text in GRIDS:
        return parse_grid(GRIDS[text])
    path = Path(text)
    if "\n" not in text and not path.exists():
        if text.endswith((".yaml", ".yml", ".json")) or os.sep in text:
            raise GridError(f"grid file {excerpt(text)} does not exist")
        raise GridError(f"{excerpt(text)} is neither a grid file nor a bundled grid ({', '.join(GRIDS)})")
    return parse_grid_text(spec_text(text, GridError, "grid"))


def parse_grid_text(text: str) -> GridSpec:
    """A grid from YAML or JSON text only (never a path or a preset name: what the HTTP API takes)."""
    return parse_grid(load_yaml(text, GridError, "grid"))


def expand_grid(spec: GridSpec, tuned: dict[str, dict[str, Any]] | None = None,
                max_trials: int | None = None) -> list[GridTrial]:
    """Every (dataset, depth, variant, seed) as a resolved trial, checked before anything runs. A recipe that
    counts epochs resolves per dataset, over its training-set size (or `subset`)."""
    from workers.recipes import RecipeError, resolve_recipe, training_size
    from workers.config import TrialConfig

    cap = max_trials or int(os.environ.get("ABLATE_MAX_TRIALS", DEFAULT_MAX_TRIALS))
    seeds = spec.seed_list
    variants = spec.variant_map()
    count = len(spec.datasets) * len(spec.depths) * len(variants) * len(seeds)
    if count > cap:
        raise GridError(f"the grid expands to {count} trials, more than the cap of {cap} (ABLATE_MAX_TRIALS)")
    recipes = {}
    for dataset in spec.datasets:
        # An image folder may hold any part of ImageNet; the other training sets have one size.
        if spec.subset and dataset != "imagenet" and spec.subset > DATASET_SIZES[dataset]:
            raise GridError(f"subset {spec.subset}: the {dataset} training set has {DATASET_SIZES[dataset]} "
                            f"examples")
        for name, recipe in spec.variant_recipes().items():
            try:
                recipes[dataset, name] = resolve_recipe(recipe, {"precision": spec.precision} if spec.precision
                                                        else None, tuned=tuned,
                                                        train_size=training_size(dataset, spec.subset))
            except RecipeError as exc:
                raise GridError(f"recipe: {exc}" if recipe is spec.recipe
                                else f"variants.{name}.recipe: {exc}") from None
            if recipes[dataset, name].sync_bn and not spec.resources.gpu:
                raise GridError("recipe: sync_bn needs GPUs (resources.gpu: 1): torch's SyncBatchNorm does not run "
                                "on CPU")
    shared = {k: v for k, v in (("block", spec.block), ("width", spec.width)) if v is not None}
    trials = []
    for dataset in spec.datasets:
        for depth in spec.depths:
            for name, fields in variants.items():
                unknown = set(fields) - set(MODEL_FIELDS)
                if unknown:
                    raise GridError(f"variants.{name}: unknown model field {excerpt(sorted(unknown)[0])}")
                try:
                    model = make_spec(**{**shared, **fields, "depth": depth, **dataset_model_fields(dataset)})
                except SpecError as exc:
                    raise GridError(f"variants.{name} at depth {excerpt(depth)}: {exc}") from None
                for seed in seeds:
                    try:
                        config = TrialConfig(model=model, dataset=dataset, subset=spec.subset,
                                             recipe=recipes[dataset, name], seed=seed, workers=spec.resources.workers)
                    except ValidationError as exc:
                        raise_one_line(exc, GridError, f"variants.{name}")
                    trials.append(GridTrial(dataset, depth, name, seed, config))
    return trials


def expand_cells(spec: GridSpec, cells: set[tuple[str, int, str]], seeds: list[int],
                 tuned: dict[str, dict[str, Any]] | None = None) -> list[GridTrial]:
    """Trials for some (dataset, depth, variant) cells of the grid under other seeds (adaptive seeding)."""
    more = expand_grid(spec.model_copy(update={"seeds": seeds}), tuned=tuned)
    return [t for t in more if (t.dataset, t.depth, t.variant) in cells]
