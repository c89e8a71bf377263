"""Fused multi-seed training: k seeds as channel groups of one network equal k solo trials, per seed.

Tolerances, measured on 2 CPU cores (depth 8, basic, width 4, synthetic subset 512, batch 32, LR 0.05):
the forward pass of a fused copy differs from its solo network by at most 2.3e-7 relative (grouped
convolutions, BN over k× the channels and the batched classifier sum in another order). Training
amplifies such differences, as it amplifies any: the solo trainer alone, run with 2 threads instead of 1,
moves seed 1's loss at iteration 20 by 1.5e-5 relative. Fused against solo over 20 iterations, the
per-seed training loss differed by at most 3.8e-6 relative with 1 thread and 1.6e-4 with 2 threads
(seed 1 again), the evaluation-mode test loss (BN running statistics at LR 0.05) by 2.5e-4 and 2.5e-3;
test and training errors were identical. Over 40 iterations (1 thread): 7.6e-5 and 1.2e-3, test errors
one to three images apart out of 1000. The bounds below hold the 2-thread figures with a margin of 3-4×
(the tests run 1 thread: 25-130× there); a wrong slice, batch, rate or gradient scale misses them by
orders of magnitude.
"""
from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch

from ablations import SHORTCUTS, UNITS, build_model, count_macs, count_params, make_spec
from ablations.resnet import join_states, split_state
from workers import trainer
from workers.checkpoint import checkpoints
from workers.fused import check_group, fused_model
from workers.recipes import resolve_recipe
from workers.trainer import device_data, evaluate, run_trial, run_trials, trial_config

TINY = dict(depth=8, block="basic", width=4)
SEEDS = (0, 1, 2)
ITERATIONS = 20
TRAIN_LOSS_RTOL = 5e-4
TEST_LOSS_RTOL = 1e-2
ERROR_IMAGES = 2  # test (and training) errors may differ by this many images
SMALLEST = {"basic": 8, "bottleneck": 11}
SHORTCUT_EXTRAS = {"scale": dict(shortcut_scale=0.5, residual_scale=0.5), "exclusive_gate": dict(gate_bias=-2.0),
                   "shortcut_gate": dict(gate_bias=-2.0), "dropout": dict(dropout=0.5),
                   "inverted_dropout": dict(dropout=0.5)}


def config(seed, **recipe_fields):
    recipe = resolve_recipe("smoke", {"iterations": ITERATIONS, "eval_every": 10, "log_every": 10, "checkpoint_every": 10,
                                      "milestones": (), **recipe_fields})
    return trial_config(TINY, "synthetic", recipe, seed, subset=512)


@pytest.fixture(scope="module")
def solo():
    return {s: run_trial(config(s), threads=1) for s in SEEDS}


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    dirs = [root / f"seed{s}" for s in SEEDS]
    return run_trials([config(s) for s in SEEDS], checkpoint_dirs=dirs, threads=1), dirs


def assert_close_history(fused_history, solo_history):
    assert [h["step"] for h in fused_history] == [h["step"] for h in solo_history]
    for f, s in zip(fused_history, solo_history):
        assert f["train_loss"] == pytest.approx(s["train_loss"], rel=TRAIN_LOSS_RTOL), f["step"]
        assert f["test_loss"] == pytest.approx(s["test_loss"], rel=TEST_LOSS_RTOL), f["step"]
        assert abs(f["test_error"] - s["test_error"]) <= 100.0 * ERROR_IMAGES / 1000, f["step"]
        assert abs(f["train_error"] - s["train_error"]) <= 100.0 * ERROR_IMAGES / (10 * 32), f["step"]
        assert f["lr"] == s["lr"]


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine every parallel region can wait
    tens of milliseconds for a descheduled thread (measured: 44 ms per BN call, 0.03 ms with one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the model ----------------------------------------------------------------------------------------------
# Each block at its default downsampling: option A (grouped zero padding) for basic, B for bottleneck.
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("unit,shortcut", list(itertools.product(UNITS, SHORTCUTS)))
def test_every_variant_fuses_and_matches_solo_per_copy(unit, shortcut, block, one_thread):
    spec = make_spec(depth=SMALLEST[block], block=block, width=4, unit=unit, shortcut=shortcut,
                     **SHORTCUT_EXTRAS.get(shortcut, {}))
    seeds = [3, 5]
    model = fused_model(spec, seeds)
    solos = []
    for seed in seeds:
        torch.manual_seed(seed)
        solos.append(build_model(spec))
    xs = [torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last) for _ in seeds]  # any size pools
    x = torch.cat(xs, 1).contiguous(memory_format=torch.channels_last)
    # Training mode too (BN batch statistics per copy), except for dropout, whose masks are random.
    for training in (False,) if "dropout" in shortcut else (False, True):
        out = model.train(training)(x).unflatten(1, (len(seeds), -1))
        for j, solo in enumerate(solos):
            torch.testing.assert_close(out[:, j], solo.train(training)(xs[j]), rtol=1e-5, atol=1e-5)


def test_initial_weights_are_the_solo_ones_bit_for_bit(one_thread):
    spec = make_spec(**TINY)
    for j, state in enumerate(split_state(fused_model(spec, list(SEEDS)).state_dict(), len(SEEDS))):
        torch.manual_seed(SEEDS[j])
        reference = build_model(spec).state_dict()
        assert list(state) == list(reference)
        assert all(torch.equal(state[k], reference[k]) for k in state)


def test_solo_model_unchanged_and_groups_multiply_parameters_and_macs(one_thread):
    spec = make_spec(depth=20, unit="full_preact")
    solo, grouped = build_model(spec), build_model(spec, groups=4)
    assert isinstance(solo.fc, torch.nn.Linear) and solo.fc.weight.shape == (10, 64)
    assert count_params(grouped) == 4 * count_params(solo)
    assert count_macs(grouped, 32) == 4 * count_macs(solo, 32)
    states = split_state(grouped.state_dict(), 4)
    assert all(s[k].shape == v.shape for s in states for k, v in solo.state_dict().items())
    rejoined = join_states(states)
    assert all(torch.equal(rejoined[k], v) for k, v in grouped.state_dict().items())


# --- training -----------------------------------------------------------------------------------------------
def test_fused_seeds_equal_solo_trials(solo, group):
    results, _ = group
    for seed, result in zip(SEEDS, results):
        reference = solo[seed]
        assert set(result) == set(reference) and (result["fused"], reference["fused"]) == (len(SEEDS), 1)
        assert (result["status"], result["iterations"], result["key"]) == ("finished", ITERATIONS, reference["key"])
        assert result["config"] == reference["config"]
        assert_close_history(result["history"], reference["history"])
        assert result["train_loss"] == [h for h in result["history"] if "train_loss" in h][-1]["train_loss"]


def test_checkpoints_are_solo_checkpoints(solo, group, tmp_path):
    _, dirs = group
    folder = tmp_path / "seed1"
    shutil.copytree(dirs[1], folder)
    (folder / "result.json").unlink()
    assert [f.name for f in checkpoints(folder)] == ["ckpt-000000020.pt", "ckpt-000000010.pt"]
    checkpoints(folder)[0].unlink()
    state = torch.load(checkpoints(folder)[0], weights_only=True)
    assert set(state) == {"config", "model", "optimizer", "history", "window", "iteration", "precision", "compiled"}
    reference = build_model(make_spec(**{**TINY, "in_channels": 3, "num_classes": 10})).state_dict()
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in reference.items()}
    # The solo trainer resumes a fused seed and lands where the solo trial lands.
    resumed = run_trial(config(1), checkpoint_dir=folder, threads=1)
    assert resumed["resumed_from"] == 10
    assert_close_history(resumed["history"], solo[1]["history"])


def test_group_resumes_from_the_newest_common_checkpoint(group, tmp_path):
    results, dirs = group
    copies = [tmp_path / d.name for d in dirs]
    for source, target in zip(dirs, copies):
        shutil.copytree(source, target)
        (target / "result.json").unlink()
    checkpoints(copies[0])[0].unlink()  # seed 0 died before writing iteration 20: the group restarts at 10
    resumed = run_trials([config(s) for s in SEEDS], checkpoint_dirs=copies, threads=1)
    for before, after in zip(results, resumed):
        assert after["resumed_from"] == 10
        # Same group, same threads: the fused run itself is deterministic, bit for bit.
        strip = [{k: v for k, v in h.items() if k != "img_per_s"} for h in before["history"]]
        assert [{k: v for k, v in h.items() if k != "img_per_s"} for h in after["history"]] == strip


def test_a_diverging_seed_stops_alone(solo, tmp_path, monkeypatch):
    real = trainer.seed_batch

    def poisoned(train_x, train_y, batches, seed, iteration, *rest):
        xb, yb = real(train_x, train_y, batches, seed, iteration, *rest)
        return (xb * float("inf") if seed == 1 and iteration >= 15 else xb), yb

    monkeypatch.setattr(trainer, "seed_batch", poisoned)
    dirs = [tmp_path / f"seed{s}" for s in SEEDS]
    configs = [config(s, checkpoint_every=5) for s in SEEDS]
    results = run_trials(configs, checkpoint_dirs=dirs, threads=1)
    bad = results[1]
    assert (bad["status"], bad["diverged_at"], bad["iterations"], bad["train_loss"]) == ("diverged", 15, 15, None)
    assert bad["fused"] == 3 and bad["divergence"]["loss"] == "nan"
    # Scored alone in its last finite state: the weights and BN statistics its checkpoint at 15 holds.
    last_finite = torch.load(dirs[1] / "ckpt-000000015.pt", weights_only=True)["model"]
    data, (_, _, eval_x, eval_y, mean, scale) = device_data(configs[1], torch.device("cpu"), None)
    model = build_model(configs[1].model)
    model.load_state_dict(last_finite)
    expected = evaluate(model.to(memory_format=torch.channels_last), eval_x, eval_y, mean, scale, False)[0][0]
    assert bad["test_error"] == pytest.approx(expected, abs=1e-9)
    assert_close_history(bad["history"], solo[1]["history"][:1])  # the evaluation before it diverged
    assert json.loads((dirs[1] / "result.json").read_text())["status"] == "diverged"
    assert [f.name for f in checkpoints(dirs[1])] == ["ckpt-000000015.pt", "ckpt-000000010.pt"]
    for j in (0, 2):
        assert results[j]["status"] == "finished"
        assert_close_history(results[j]["history"], solo[SEEDS[j]]["history"])
    # Run again: every seed has its result, so nothing trains and the stored records come back.
    monkeypatch.setattr(trainer, "seed_batch", None)
    assert run_trials(configs, checkpoint_dirs=dirs, threads=1) == results


def test_dropout_variant_trains_fused():
    recipe = resolve_recipe("smoke", {"iterations": 10, "eval_every": 10, "milestones": ()})
    configs = [trial_config({**TINY, "shortcut": "dropout"}, "synthetic", recipe, s, subset=512) for s in (0, 1)]
    a, b = run_trials(configs, threads=1), run_trials(configs, threads=1)
    assert [r["status"] for r in a] == ["finished", "finished"]
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # reproducible for the same group


def test_group_must_differ_only_in_seed():
    with pytest.raises(ValueError, match="differ only in the seed.*recipe"):
        check_group([config(0), config(1, lr=0.2)])
    with pytest.raises(ValueError, match="distinct seeds"):
        check_group([config(0), config(0)])
    with pytest.raises(ValueError, match="checkpoint_dirs has 1 entries for 2 configs"):
        run_trials([config(0), config(1)], checkpoint_dirs=["x"])
