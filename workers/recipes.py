"""Training recipes as data: every field with the reason it has its value.

A recipe is iteration-based like the paper's CIFAR recipe (learning-rate drops at fixed iterations), so
the same recipe means the same optimisation on any dataset size. A bundled recipe or a grid may instead
count epochs (`epochs`, `milestones_epochs`, `eval_every_epochs`), as fb.resnet.torch does on ImageNet:
those resolve to iterations once the training-set size is known (`training_size`), and only the resolved
recipe exists afterwards, so a trial's key is still the hash of the iterations it trains.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ablations.spec import excerpt, omit_at_defaults, raise_one_line
from ablations.vocabulary import DATASET_SIZES

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
    # Intermediate evaluations may use the first N images of the evaluation split (a fixed subset) to draw
    # the test-error curve cheaply; the final evaluation always uses the whole split. None: all of it.
    eval_images: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(ge=1)
    # Training loss, error, learning rate and throughput are logged every `log_every` iterations
    # (None: about 1% of the run), and sent live at least every `log_every_s` seconds of wall time.
    log_every: int | None = Field(None, ge=1)
    log_every_s: float = Field(30.0, gt=0)
    augment: bool = True
    nesterov: bool = Field(False, description="Nesterov momentum (fb.resnet.torch's SGD, dampening 0)")
    # auto: bf16 autocast where the device makes it faster (CUDA, CPUs with bf16 matrix units), else fp32.
    # BN statistics, the loss, the gates and the optimizer state stay fp32 either way.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Several workers of one trial: BN statistics over the whole global batch (torch's SyncBatchNorm, CUDA
    # only) instead of each worker's share (the paper's per-GPU BN, the default).
    sync_bn: bool = False

    # Fields added after trial keys were first made, left out of the dump at their defaults.
    _later = omit_at_defaults("nesterov", "sync_bn")

    @model_validator(mode="after")
    def _check_schedule(self) -> "Recipe":
        if self.nesterov and self.momentum == 0:
            raise RecipeError("nesterov needs a momentum above 0")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise RecipeError(f"milestones must be strictly increasing, got {excerpt(list(self.milestones))}")
        if self.milestones and (self.milestones[0] <= 0 or self.milestones[-1] >= self.iterations):
            raise RecipeError(f"milestones must lie in 1..{self.iterations - 1}, got {excerpt(list(self.milestones))} "
                              f"(iterations alone stretches the base schedule; milestones given beside it "
                              f"replace the stretched ones)")
        if self.warmup_iterations >= self.iterations:
            raise RecipeError(f"warmup_iterations ({excerpt(self.warmup_iterations)}) must be below iterations "
                              f"({self.iterations})")
        return self

    def lr_at(self, iteration: int) -> float:
        """Learning rate for the update made at `iteration` (0-based): warm-up, then step drops."""
        if iteration < self.warmup_iterations:
            return self.warmup_lr
        drops = sum(iteration >= m for m in self.milestones)
        return self.lr * self.gamma ** drops

    @property
    def log_interval(self) -> int:
        return self.log_every or max(1, round(self.iterations / 100))

    def with_iterations(self, iterations: int) -> "Recipe":
        """The same schedule stretched to another length: milestones, warm-up and intervals scale."""
        return make_recipe(stretched(self.model_dump(), iterations))


def stretched(fields: Mapping[str, Any], iterations: int) -> dict[str, Any]:
    """Recipe fields with the schedule stretched from `fields["iterations"]` to `iterations`: milestones,
    warm-up and the evaluation, checkpoint and logging intervals scale with it."""
    f = iterations / fields["iterations"]
    scaled = {"iterations": iterations, "milestones": [max(1, round(m * f)) for m in fields.get("milestones", ())],
              "warmup_iterations": min(round(fields.get("warmup_iterations", 0) * f), iterations - 1)}
    for name in ("eval_every", "checkpoint_every", "log_every"):
        if fields.get(name):
            scaled[name] = max(1, round(fields[name] * f))
    return {**fields, **scaled}


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
    # Evaluations every 100 iterations draw the test-error curve (Fig. 6) on 2000 test images; the last one
    # reads the whole test set.
    "mini-cpu": dict(iterations=800, batch_size=64, lr=0.1, momentum=0.9, weight_decay=1e-4,
                     milestones=(400, 600), gamma=0.1, warmup_iterations=50, warmup_lr=0.01,
                     eval_every=100, eval_images=2000, checkpoint_every=100, augment=False),
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
    fields resolve to iterations over `train_size` examples (see `in_iterations`)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RecipeError(f"unknown recipe field {excerpt(unknown[0])}; fields: {', '.join(FIELDS)}")
    try:
        return Recipe(**in_iterations(fields, train_size, fields.get("batch_size")))
    except ValidationError as exc:
        raise_one_line(exc, RecipeError, "recipe")


def in_iterations(fields: Mapping[str, Any], train_size: int | None, batch_size: Any) -> dict[str, Any]:
    """Recipe fields with the epoch ones resolved to iterations: `train_size // batch_size` iterations an
    epoch (the last partial batch of an epoch dropped, as the trainer does)."""
    given = [f for f in EPOCH_FIELDS if f in fields]
    if not given:
        return dict(fields)
    both = [f for f in given if EPOCH_FIELDS[f] in fields]
    if both:
        raise RecipeError(f"give {both[0]} or {EPOCH_FIELDS[both[0]]}, not both")
    if train_size is None:
        raise RecipeError(f"the recipe counts epochs ({', '.join(given)}): it needs the training-set size")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 0 < batch_size <= train_size:
        raise RecipeError(f"batch_size {excerpt(batch_size)} must be a whole number from 1 to the {train_size} "
                          f"training examples of an epoch")
    per_epoch = train_size // batch_size
    out = dict(fields)
    for name in given:
        value = out.pop(name)
        try:
            out[EPOCH_FIELDS[name]] = ([round(e * per_epoch) for e in value] if name == "milestones_epochs"
                                       else max(1, round(value * per_epoch)))
        except TypeError:
            raise RecipeError(f"{name}: expected {'a list of numbers' if name == 'milestones_epochs' else 'a number'}"
                              f", got {excerpt(value)}") from None
    return out


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
        raise RecipeError(f"--set expects FIELD=VALUE, got {excerpt(text)}")
    field, raw = (s.strip() for s in text.split("=", 1))
    if field not in FIELDS:
        raise RecipeError(f"unknown recipe field {excerpt(field)}; fields: {', '.join(FIELDS)}")
    if field in ("milestones", "milestones_epochs") and not raw.startswith("["):
        raw = f"[{raw}]"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise RecipeError(f"--set {field}: cannot read value {excerpt(raw)}") from None
    return field, value


def resolve_recipe(recipe: str | Mapping[str, Any] | Recipe = "mini-cpu", overrides: Mapping[str, Any] | None = None,
                   tuned: Mapping[str, Mapping[str, Any]] | None = None, train_size: int | None = None) -> Recipe:
    """A bundled name, a mapping `{base: NAME, field: value}`, or a Recipe; then overrides on top.

    `iterations` means one thing wherever it is given (a grid's recipe mapping, `--set`, `--iterations`):
    the base schedule stretched to that length (see `stretched`); fields given beside it, such as
    `milestones`, replace the stretched ones. `epochs` is `iterations` counted in epochs of `train_size`
    examples (see `training_size`), and the same for `milestones_epochs` and `eval_every_epochs`: a recipe
    that counts epochs needs it, iteration recipes ignore it. `tuned` maps names saved by tuning
    (`tuned/<name>`) to their recipe fields.
    """
    if isinstance(recipe, Recipe):
        base_fields, own = recipe.model_dump(), {}
    else:
        spec = {"base": recipe} if isinstance(recipe, str) else dict(recipe)
        base = spec.pop("base", "mini-cpu")
        library = {**RECIPES, **{f"tuned/{k}": v for k, v in (tuned or {}).items()}}
        if base not in library:
            raise RecipeError(f"unknown recipe {excerpt(base)}; bundled: {', '.join(RECIPES)}"
                              + (f"; tuned: {', '.join(tuned)}" if tuned else ""))
        base_fields, own = dict(library[base]), spec
    given = _on_top(own, overrides or {})
    batch = given.get("batch_size", base_fields["batch_size"])
    base_fields = in_iterations(base_fields, train_size, batch)
    given = in_iterations(given, train_size, batch)
    iterations = given.get("iterations")
    if isinstance(iterations, int) and not isinstance(iterations, bool) and iterations >= 1 \
            and iterations != base_fields["iterations"]:
        base_fields = stretched(base_fields, iterations)
    return make_recipe({**base_fields, **given})
