"""The trial loop: recipes, determinism, exact resume after SIGKILL, divergence, bad checkpoints."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import ROOT, ablate
from workers.checkpoint import CheckpointError, checkpoints
from workers.recipes import RecipeError, parse_override, resolve_recipe
from workers.sinks import MemorySink
from workers.trainer import augment, run_trial, trial_config

TINY = dict(depth=8, block="basic", width=4)


def tiny_trial(seed=0, **recipe_fields):
    recipe = resolve_recipe("smoke", recipe_fields)
    return trial_config(TINY, "synthetic", recipe, seed, subset=512)


# --- recipes ----------------------------------------------------------------------------------------------
def test_paper_recipe_schedule():
    r = resolve_recipe("paper-cifar")
    assert (r.iterations, r.batch_size, r.momentum, r.weight_decay) == (64_000, 128, 0.9, 1e-4)
    assert r.lr_at(0) == r.lr_at(399) == 0.01 and r.lr_at(400) == 0.1
    assert r.lr_at(31_999) == 0.1 and r.lr_at(32_000) == pytest.approx(0.01) and r.lr_at(48_000) == pytest.approx(0.001)


def test_overrides_and_rescaling():
    r = resolve_recipe("mini-cpu", dict([parse_override("lr=0.05"), parse_override("milestones=100,200"),
                                            parse_override("iterations=300"), parse_override("augment=false")]))
    assert (r.lr, r.milestones, r.iterations, r.augment) == (0.05, (100, 200), 300, False)
    short = resolve_recipe("paper-cifar").with_iterations(640)
    assert short.milestones == (320, 480) and short.warmup_iterations == 4
    assert resolve_recipe({"base": "mini-cpu", "lr": 0.2}).lr == 0.2


@pytest.mark.parametrize("recipe,overrides,needle", [
    ("nope", {}, "unknown recipe 'nope'"),
    ("smoke", {"learning_rate": 1}, "unknown recipe field 'learning_rate'"),
    ("smoke", {"milestones": [30, 10]}, "strictly increasing"),
    ("smoke", {"milestones": [99]}, "milestones must lie in"),
    ("smoke", {"batch_size": 1}, "batch_size"),
    ("smoke", {"warmup_iterations": 40}, "warmup_iterations"),
])
def test_recipe_errors(recipe, overrides, needle):
    with pytest.raises(RecipeError) as info:
        resolve_recipe(recipe, overrides)
    assert needle in str(info.value)


# --- the loop ------------------------------------------------------------------------------------------------
def test_augment_is_a_padded_crop_possibly_flipped():
    x = torch.randn(6, 2, 8, 8)
    out = augment(x, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        crops = [c for dy in range(9) for dx in range(9) for c in (padded[i, :, dy:dy + 8, dx:dx + 8],)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)


def test_deterministic_and_seed_dependent():
    a, b = run_trial(tiny_trial(0), threads=1), run_trial(tiny_trial(0), threads=1)
    c = run_trial(tiny_trial(1), threads=1)
    assert a["history"] == [dict(h, img_per_s=a["history"][i]["img_per_s"]) for i, h in enumerate(b["history"])]
    assert (a["test_error"], a["train_loss"]) == (b["test_error"], b["train_loss"])
    assert a["train_loss"] != c["train_loss"]
    assert a["status"] == "finished" and a["iterations"] == 40 and a["resumed_from"] is None


def test_learns_synthetic_data():
    result = run_trial(tiny_trial(0, iterations=150, eval_every=150, checkpoint_every=150), threads=2)
    assert result["test_error"] < 40.0  # chance is 90%


def test_divergence_is_a_result():
    # λ = 4 on every shortcut: the signal grows as 4^units (Eqn. 6-8), and the loss overflows in a few steps.
    exploding = dict(depth=20, width=4, shortcut="scale", shortcut_scale=4.0)
    sink = MemorySink()
    result = run_trial(trial_config(exploding, "synthetic", resolve_recipe("smoke"), 0, subset=512), sink=sink,
                       threads=1)
    assert result["status"] == "diverged" and result["iterations"] < 40
    assert 0.0 <= result["test_error"] <= 100.0 and result["train_loss"] is None
    assert sink.records and sink.records[-1]["step"] == result["diverged_at"]


def test_metrics_reach_the_sink_at_eval_points():
    sink = MemorySink()
    result = run_trial(tiny_trial(0), sink=sink, threads=1)
    assert [r["step"] for r in sink.records] == [20, 40]
    assert {"train_loss", "train_error", "test_error", "img_per_s"} <= set(sink.records[0])
    assert sink.records[-1]["test_error"] == result["test_error"]


# --- checkpoints -----------------------------------------------------------------------------------------------
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    full = run_trial(tiny_trial(0), threads=1)
    run_trial(tiny_trial(0, iterations=40), checkpoint_dir=tmp_path, threads=1)
    # Roll back to an intermediate checkpoint by deleting the newer ones, then resume.
    files = checkpoints(tmp_path)
    assert [f.name for f in files] == ["ckpt-000000040.pt", "ckpt-000000030.pt"]
    files[0].unlink()
    resumed = run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    assert resumed["resumed_from"] == 30
    assert (resumed["test_error"], resumed["train_loss"]) == (full["test_error"], full["train_loss"])
    assert (tmp_path / "result.json").exists()


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    newest, older = checkpoints(tmp_path)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        result = run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    assert result["resumed_from"] == 30


def test_all_checkpoints_corrupt_starts_over(tmp_path):
    run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    for f in checkpoints(tmp_path):
        f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="starting from iteration 0"):
        assert run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)["resumed_from"] is None


def test_checkpoint_of_another_trial_is_refused(tmp_path):
    run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    with pytest.raises(CheckpointError, match="another trial"):
        run_trial(tiny_trial(5), checkpoint_dir=tmp_path, threads=1)


def test_unwritable_checkpoint_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="not writable"):
        run_trial(tiny_trial(0), checkpoint_dir=blocker / "sub", threads=1)


TRAIN_ARGS = ["train", "--dataset", "synthetic", "--subset", "512", "--depth", "8", "--block", "basic",
              "--width", "4", "--recipe", "smoke", "--set", "iterations=120", "--set", "checkpoint_every=4",
              "--set", "eval_every=60", "--set", "milestones=90", "--threads", "1", "--json"]


def test_sigkill_mid_trial_then_resume_is_bit_identical(tmp_path):
    reference = ablate(*TRAIN_ARGS, "--checkpoint-dir", str(tmp_path / "ref"))
    assert reference.code == 0, reference.err
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *TRAIN_ARGS, "--checkpoint-dir", str(killed_dir)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(int(f.name[5:14]) >= 40 for f in checkpoints(killed_dir)):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before_kill = max(int(f.name[5:14]) for f in checkpoints(killed_dir))
    assert 40 <= done_before_kill < 120, "the kill must land mid-trial"
    resumed = ablate(*TRAIN_ARGS, "--checkpoint-dir", str(killed_dir))
    assert resumed.code == 0, resumed.err
    assert resumed.json["resumed_from"] >= 40
    for field in ("test_error", "train_loss", "status", "iterations"):
        assert resumed.json[field] == reference.json[field], field
    final_a = torch.load(tmp_path / "ref" / "ckpt-000000120.pt", weights_only=True)["model"]
    final_b = torch.load(killed_dir / "ckpt-000000120.pt", weights_only=True)["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


@pytest.mark.parametrize("args,needle", [
    (["--recipe", "fast"], "unknown recipe 'fast'"),
    (["--set", "lr"], "FIELD=VALUE"),
    (["--set", "colour=red"], "unknown recipe field 'colour'"),
    (["--subset", "0"], "subset"),
    (["--seed", "-3"], "seed"),
])
def test_train_bad_input_exit_2(args, needle):
    r = ablate("train", "--dataset", "synthetic", "--depth", "8", "--block", "basic", *args, "--json")
    assert r.code == 2, r.err
    assert needle in r.json["error"] and "Traceback" not in r.err


def test_cifar_missing_names_the_layout(tmp_path):
    r = ablate("train", "--dataset", "cifar10", "--depth", "8", "--block", "basic", "--json",
               env={"ABLATE_DATA_DIR": str(tmp_path)})
    assert r.code == 2 and "cifar-10-batches-py" in r.json["error"]


@pytest.mark.realdata
def test_train_on_real_fashion_mnist():
    r = ablate("train", "--dataset", "fashion-mnist", "--subset", "5000", "--depth", "8", "--block", "basic",
               "--width", "8", "--recipe", "mini-cpu", "--iterations", "120", "--json")
    assert r.code == 0, r.err
    out = r.json
    assert out["status"] == "finished" and out["iterations"] == 120
    assert out["test_error"] < 50.0 and math.isfinite(out["train_loss"])  # chance: 90%


def test_time_limit_stops_an_attempt_and_keeps_its_checkpoints(tmp_path):
    from workers.trainer import TrialTimeout
    run_trial(tiny_trial(0, iterations=40), checkpoint_dir=tmp_path, threads=1)
    checkpoints(tmp_path)[0].unlink()  # back to iteration 30
    with pytest.raises(TrialTimeout, match="time limit of 1e-09 s at iteration 30"):
        run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1, time_limit_s=1e-9)
    assert [f.name for f in checkpoints(tmp_path)] == ["ckpt-000000030.pt"]
