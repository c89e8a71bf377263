"""Epoch-based recipes: resolved to iterations over a training-set size, so a trial key still hashes what
trains; Nesterov momentum; iteration recipes unchanged."""
from __future__ import annotations

import pytest

from workers.recipes import RECIPES, RecipeError, parse_override, resolve_recipe, training_size
from workers.trainer import run_trial, trial_config


def test_paper_imagenet_is_fb_resnet_torch_over_ilsvrc():
    assert training_size("imagenet") == 1_281_167
    r = resolve_recipe("paper-imagenet", train_size=training_size("imagenet"))
    per_epoch = 1_281_167 // 256  # 5004: the last partial batch of an epoch is dropped
    assert (r.batch_size, r.lr, r.momentum, r.nesterov, r.weight_decay) == (256, 0.1, 0.9, True, 1e-4)
    assert (r.iterations, r.milestones, r.eval_every) == (90 * per_epoch, (30 * per_epoch, 60 * per_epoch), per_epoch)
    assert r.lr_at(30 * per_epoch - 1) == 0.1 and r.lr_at(30 * per_epoch) == pytest.approx(0.01)
    assert r.lr_at(90 * per_epoch - 1) == pytest.approx(0.001) and r.warmup_iterations == 0


def test_resnet1k_batch64_on_cifar10():
    r = resolve_recipe("resnet1k-batch64", train_size=training_size("cifar10"))
    assert (r.batch_size, r.iterations, r.milestones) == (64, 200 * 781, (80 * 781, 121 * 781))


@pytest.mark.parametrize("dataset,subset,validation,size", [
    ("cifar10", None, 0.0, 50_000), ("cifar10", None, 0.1, 45_000), ("imagenet", 2560, 0.0, 2560),
    ("fashion-mnist", 1000, 0.25, 750)])
def test_training_size_follows_subset_and_validation(dataset, subset, validation, size):
    assert training_size(dataset, subset, validation) == size


def test_epochs_resolve_over_the_given_size_and_overrides_replace_their_twin():
    small = resolve_recipe({"base": "paper-imagenet", "epochs": 3, "milestones_epochs": [1, 2]}, train_size=2560)
    assert (small.iterations, small.milestones) == (30, (10, 20))
    # `epochs` is `iterations` counted in epochs: it stretches the base schedule too (90 epochs → 3: the
    # evaluation once an epoch becomes once every 1/30 epoch), unless the interval is given beside it.
    assert small.eval_every == 1
    again = resolve_recipe({"base": "paper-imagenet", "epochs": 3, "eval_every_epochs": 1}, train_size=2560)
    assert (again.milestones, again.eval_every) == ((10, 20), 10)
    # An iteration field given on top replaces its epoch twin, and the reverse.
    mixed = resolve_recipe("paper-imagenet", {"iterations": 25, "milestones": [5]}, train_size=2560)
    assert (mixed.iterations, mixed.milestones) == (25, (5,))
    back = resolve_recipe({"base": "smoke", "epochs": 2, "milestones_epochs": [1]}, train_size=320)
    assert (back.iterations, back.milestones) == (20, (10,))
    assert parse_override("milestones_epochs=30,60") == ("milestones_epochs", [30, 60])


def test_iteration_recipes_ignore_the_size_and_dump_as_before():
    assert resolve_recipe("paper-cifar", train_size=10) == resolve_recipe("paper-cifar")
    assert "nesterov" not in resolve_recipe("paper-cifar").model_dump()  # keys made before it existed stay
    assert all("epochs" not in fields for name, fields in RECIPES.items() if name != "paper-imagenet"
               and name != "resnet1k-batch64")


@pytest.mark.parametrize("recipe,overrides,size,needle", [
    ("paper-imagenet", {}, None, "counts epochs (epochs, milestones_epochs, eval_every_epochs): it needs the "
                                 "training-set size"),
    ({"base": "paper-imagenet", "epochs": 2, "iterations": 10}, {}, 2560, "give epochs or iterations, not both"),
    ("paper-imagenet", {"batch_size": 512}, 100, "batch_size 512 must be a whole number from 1 to the 100"),
    ("paper-imagenet", {"milestones_epochs": "soon"}, 2560, "milestones_epochs: expected a list of numbers"),
    ("smoke", {"nesterov": True, "momentum": 0.0}, None, "nesterov needs a momentum above 0"),
    ("smoke", {"epochz": 3}, None, "unknown recipe field 'epochz'"),
])
def test_epoch_recipe_errors(recipe, overrides, size, needle):
    with pytest.raises(RecipeError) as info:
        resolve_recipe(recipe, overrides, train_size=size)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_nesterov_reaches_the_optimizer():
    tiny = dict(depth=8, block="basic", width=4)
    runs = [run_trial(trial_config(tiny, "synthetic", resolve_recipe("smoke", {"iterations": 6, "nesterov": flag,
                                                                                "milestones": [], "eval_every": 6}),
                                   0, subset=128), threads=1)
            for flag in (False, True)]
    assert runs[0]["train_loss"] != runs[1]["train_loss"]
    assert runs[1]["config"]["recipe"]["nesterov"] is True and "nesterov" not in runs[0]["config"]["recipe"]
