"""Training recipes as data: every field with the reason it has its value.

A recipe is iteration-based like the paper's CIFAR recipe (learning-rate drops at fixed iterations), so
the same recipe means the same optimisation on any dataset size. A bundled recipe or a grid may instead
count epochs (`epochs`, `milestones_epochs`, `eval_every_epochs`), as fb.resnet.torch does on ImageNet:
those resolve to iterations once the training-set size is known (`training_size`), and only the resolved
recipe exists afterwards, so a trial's key is still the hash of the iterations it trains.
"""
from __future__ import annotations

from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from ablations.spec import DATASET_SIZES, raise_one_line

# Epoch fields of a recipe mapping → the iteration field each resolves to (epochs × iterations per epoch).
EPOCH_FIELDS = {"epochs": "iterations", "milestones_epochs": "milestones", "eval_every_epochs": "eval_every"}


class RecipeError(ValueError):
    """An unknown recipe, an unknown field or a value out of range; one line."""


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(ge=1, le=10_000_000)
    batch_size: int = Field(ge=2, le=65536)  # ≥ 2: BN needs batch statistics
    lr: float = Field(gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    milestones: tuple[int, ...] = ()
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_iterations: int = Field(0, ge=0)
    warmup_lr: float = Field(0.01, gt=0, le=100)
    eval_every: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)
    augment: bool = True
    nesterov: bool = Field(False, description="Nesterov momentum (fb.resnet.torch's SGD, dampening 0)")

    @model_serializer(mode="wrap")
    def _omit_plain_momentum(self, handler) -> dict[str, Any]:
        # `nesterov` came after the first trial keys were made: left out at its default, so every earlier
        # configuration keeps its trial key and its checkpoints.
        data = handler(self)
        if not data.get("nesterov", True):
            del data["nesterov"]
        return data

    @model_validator(mode="after")
    def _check_schedule(self) -> "Recipe":
        if self.nesterov and self.momentum == 0:
            raise RecipeError("nesterov needs a momentum above 0")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise RecipeError(f"milestones must be strictly increasing, got {list(self.milestones)}")
        if self.milestones and (self.milestones[0] <= 0 or self.milestones[-1] >= self.iterations):
            raise RecipeError(f"milestones must lie in 1..{self.iterations - 1}, got {list(self.milestones)}")
        if self.warmup_iterations >= self.iterations:
            raise RecipeError(f"warmup_iterations ({self.warmup_iterations}) must be below iterations "
                              f"({self.iterations})")
        return self

    def lr_at(self, iteration: int) -> float:
        """Learning rate for the update made at `iteration` (0-based): warm-up, then step drops."""
        if iteration < self.warmup_iterations:
            return self.warmup_lr
        drops = sum(iteration >= m for m in self.milestones)
        return self.lr * self.gamma ** drops

    def with_iterations(self, iterations: int) -> "Recipe":
        """The same schedule stretched to another length: milestones, warm-up and intervals scale."""
        f = iterations / self.iterations
        return make_recipe({**self.model_dump(), "iterations": iterations,
                            "milestones": [max(1, round(m * f)) for m in self.milestones],
                            "warmup_iterations": min(round(self.warmup_iterations * f), iterations - 1),
                            "eval_every": max(1, round(self.eval_every * f)),
                            "checkpoint_every": max(1, round(self.checkpoint_every * f))})


RECIPES: dict[str, dict[str, Any]] = {
    # He et al. 2016, CIFAR recipe (appendix): SGD momentum 0.9, weight decay 1e-4, batch 128; LR 0.1
    # with a 0.01 warm-up for 400 iterations, ÷10 at 32k and 48k, stop at 64k; pad-4 crop and flip.
    "paper-cifar": dict(iterations=64_000, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-4,
                        milestones=(32_000, 48_000), gamma=0.1, warmup_iterations=400, warmup_lr=0.01,
                        eval_every=2_000, checkpoint_every=1_000, augment=True),
    # Minutes on two CPU cores at depth 20 on Fashion-MNIST: the paper's shape (warm-up, two ÷10 drops at
    # 1/2 and 3/4) compressed to 800 iterations of 64. Drops before the end matter: test error measured at
    # LR 0.1 is mostly BN-statistics noise (shared/NOTES.md), and separates nothing at a few seeds.
    # No augmentation: 800×64 is under one epoch, where crops and flips only slow fitting (measured on
    # full_preact-20, seed 0: 19.44% test error with them, 13.29% without).
    "mini-cpu": dict(iterations=800, batch_size=64, lr=0.1, momentum=0.9, weight_decay=1e-4,
                     milestones=(400, 600), gamma=0.1, warmup_iterations=50, warmup_lr=0.01,
                     eval_every=400, checkpoint_every=100, augment=False),
    # fb.resnet.torch on ImageNet, which the paper follows for its ImageNet results ("the same hyper-parameters
    # and implementations as the original ResNets"): batch 256, LR 0.1 ÷10 every 30 epochs, 90 epochs, weight
    # decay 1e-4, Nesterov momentum 0.9, no warm-up (train.lua, opts.lua). Evaluated once an epoch.
    "paper-imagenet": dict(epochs=90, batch_size=256, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                           milestones_epochs=(30, 60), gamma=0.1, warmup_iterations=0, warmup_lr=0.01,
                           eval_every_epochs=1, checkpoint_every=1_000, augment=True),
    # The ResNet-1001 at batch 64 that reached 4.62% on CIFAR-10 (He et al. 2016; the resnet-1k-layers
    # README): fb.resnet.torch's CIFAR schedule, `-batchSize 64 -nEpochs 200`: LR 0.1, ÷10 from epochs 81
    # and 122 (train.lua), Nesterov momentum 0.9, weight decay 1e-4, no warm-up, pad-4 crop and flip.
    "resnet1k-batch64": dict(epochs=200, batch_size=64, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                             milestones_epochs=(80, 121), gamma=0.1, warmup_iterations=0, warmup_lr=0.01,
                             eval_every_epochs=4, checkpoint_every=2_000, augment=True),
    # Seconds: for tests and the smoke grid on synthetic data.
    "smoke": dict(iterations=40, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4, milestones=(30,),
                  gamma=0.1, warmup_iterations=0, warmup_lr=0.01, eval_every=20, checkpoint_every=10,
                  augment=True),
}
FIELDS = (*Recipe.model_fields, *EPOCH_FIELDS)
ITERATION_FIELDS = {iterations: epochs for epochs, iterations in EPOCH_FIELDS.items()}


def training_size(dataset: str, subset: int | None = None, validation: float = 0.0) -> int:
    """Examples in one epoch of a trial's training set: the dataset's size (or `subset`) less the validation
    fraction, as workers/data.py splits it. What an epoch-based recipe counts in."""
    n = subset or DATASET_SIZES[dataset]
    return n - round(validation * n)


def make_recipe(fields: Mapping[str, Any], train_size: int | None = None) -> Recipe:
    """Recipe from a mapping, with validation errors as one RecipeError line naming the field; epoch
    fields resolve to iterations over `train_size` examples (the last partial batch of an epoch dropped)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RecipeError(f"unknown recipe field {unknown[0]!r}; fields: {', '.join(FIELDS)}")
    given = [f for f in EPOCH_FIELDS if f in fields]
    if given:
        both = [f for f in given if EPOCH_FIELDS[f] in fields]
        if both:
            raise RecipeError(f"give {both[0]} or {EPOCH_FIELDS[both[0]]}, not both")
        if train_size is None:
            raise RecipeError(f"the recipe counts epochs ({', '.join(given)}): it needs the training-set size")
        batch = fields.get("batch_size")
        if not isinstance(batch, int) or isinstance(batch, bool) or not 0 < batch <= train_size:
            raise RecipeError(f"batch_size {batch!r} must be a whole number from 1 to the {train_size} training "
                              f"examples of an epoch")
        per_epoch = train_size // batch
        fields = dict(fields)
        for name in given:
            value = fields.pop(name)
            try:
                fields[EPOCH_FIELDS[name]] = ([round(e * per_epoch) for e in value] if name == "milestones_epochs"
                                              else max(1, round(value * per_epoch)))
            except TypeError:
                raise RecipeError(f"{name}: expected {'a list of numbers' if name == 'milestones_epochs' else 'a number'}"
                                  f", got {value!r}") from None
    try:
        return Recipe(**fields)
    except ValidationError as exc:
        raise_one_line(exc, RecipeError, "recipe")


def _on_top(fields: Mapping[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    """`more` over `fields`, where a field given in iterations replaces its epoch twin and the reverse."""
    out = dict(fields)
    for name, value in more.items():
        out.pop(EPOCH_FIELDS.get(name) or ITERATION_FIELDS.get(name), None)
        out[name] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`FIELD=VALUE` from the command line; VALUE is YAML (numbers, booleans, [lists]) or a,b,c."""
    if "=" not in text:
        raise RecipeError(f"--set expects FIELD=VALUE, got {text!r}")
    field, raw = (s.strip() for s in text.split("=", 1))
    if field not in FIELDS:
        raise RecipeError(f"unknown recipe field {field!r}; fields: {', '.join(FIELDS)}")
    if field in ("milestones", "milestones_epochs") and not raw.startswith("["):
        raw = f"[{raw}]"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise RecipeError(f"--set {field}: cannot read value {raw!r}") from None
    return field, value


def resolve_recipe(recipe: str | Mapping[str, Any] | Recipe = "mini-cpu", overrides: Mapping[str, Any] | None = None,
                   tuned: Mapping[str, Mapping[str, Any]] | None = None, train_size: int | None = None) -> Recipe:
    """A bundled name, a mapping `{base: NAME, field: value}`, or a Recipe; then overrides on top.

    `tuned` maps names saved by tuning (`tuned/<name>`) to their recipe fields. `train_size` (examples per
    epoch, see `training_size`) resolves a recipe that counts epochs; iteration recipes ignore it.
    """
    if isinstance(recipe, Recipe):
        fields = recipe.model_dump()
    else:
        spec = {"base": recipe} if isinstance(recipe, str) else dict(recipe)
        base = spec.pop("base", "mini-cpu")
        library = {**RECIPES, **{f"tuned/{k}": v for k, v in (tuned or {}).items()}}
        if base not in library:
            raise RecipeError(f"unknown recipe {base!r}; bundled: {', '.join(RECIPES)}"
                              + (f"; tuned: {', '.join(tuned)}" if tuned else ""))
        both = [f for f in EPOCH_FIELDS if f in spec and EPOCH_FIELDS[f] in spec]
        if both:
            raise RecipeError(f"give {both[0]} or {EPOCH_FIELDS[both[0]]}, not both")
        fields = _on_top(library[base], spec)
    return make_recipe(_on_top(fields, overrides or {}), train_size)
