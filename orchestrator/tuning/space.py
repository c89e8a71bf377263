"""The search space as Optuna sees it: distributions, the recipe each trial's parameters make, pruners."""
from __future__ import annotations

from typing import Any

from ablations.spec import SpecError, excerpt
from workers.recipes import RecipeError, make_recipe, resolve_recipe, training_size

from .spec import TUNABLE, TuneError, TuneSpec, decode_param, encode_choice

# The median of fewer finished curves says little; Optuna's default (5) suits studies of hundreds.
MEDIAN_STARTUP_TRIALS = 3


def trial_recipe(base, params: dict[str, Any]):
    """The base recipe with a trial's parameters on top; milestone fractions become iterations."""
    fields = base.model_dump()
    for field, value in params.items():
        if field == "milestone_fractions":
            fields["milestones"] = [round(f * base.iterations) for f in decode_param(field, value)]
        else:
            fields[field] = value
    return make_recipe(fields)


def search_space(spec: TuneSpec, base) -> dict[str, Any]:
    """Optuna distributions for the space, each bound and choice checked as a recipe on the base."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    out: dict[str, Any] = {}
    for field, entry in spec.space.items():
        values = entry["choices"] if "choices" in entry else [entry["low"], entry["high"]]
        for v in values:
            try:
                trial_recipe(base, {field: encode_choice(v)})
            except RecipeError as exc:
                raise TuneError(f"space.{field}: {excerpt(v)} makes an invalid recipe: {exc}") from None
        if "choices" in entry:
            out[field] = CategoricalDistribution([encode_choice(c) for c in entry["choices"]])
        elif TUNABLE[field] is int:
            out[field] = IntDistribution(entry["low"], entry["high"], log=entry.get("log", False))
        else:
            out[field] = FloatDistribution(float(entry["low"]), float(entry["high"]), log=entry.get("log", False))
    return out


def make_pruner(name: str, recipe):
    """Steps are training iterations: evaluations come every `eval_every`, the run ends at `iterations`.

    The median pruner waits for the recipe's first learning-rate drop: before it, a larger rate plateaus
    at a higher error that the drop then erases (the paper's curves), so early medians favour small rates.
    """
    import optuna
    if name == "median":
        first_drop = recipe.milestones[0] if recipe.milestones else 0
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=first_drop)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=recipe.eval_every, max_resource=recipe.iterations)
    return optuna.pruners.NopPruner()


def prepare(spec: TuneSpec, tuned: dict[str, dict[str, Any]]):
    """(base recipe, distributions, template TrialConfig): everything checked before a trial runs."""
    from workers.trainer import trial_config  # imports torch: only drivers that run a study pay for it
    try:
        base = resolve_recipe(spec.base, tuned=tuned,
                              train_size=training_size(spec.dataset, spec.subset, spec.validation))
    except RecipeError as exc:
        raise TuneError(f"base: {exc}") from None
    space = search_space(spec, base)
    try:
        template = trial_config(spec.network_fields(), spec.dataset, base, spec.seed, subset=spec.subset,
                                validation=spec.validation)
    except SpecError as exc:
        raise TuneError(f"model: {exc}") from None
    return base, space, template
