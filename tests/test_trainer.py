"""The trial loop: recipes, determinism, exact resume after SIGKILL, divergence, bad checkpoints."""
from __future__ import annotations

import json
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
from ablations import build_model
from workers import trainer
from workers.trainer import augment, device_data, evaluate, run_trial, trial_config

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


def test_an_exploding_finite_loss_is_divergence():
    # λ = 2 on every shortcut of ResNet-32: the signal grows as 2^15 (Eqn. 6-8); the loss at initialisation is
    # in the thousands, finite, and far above 100·ln(10). The run is scored in its initial state.
    exploding = dict(depth=32, width=4, shortcut="scale", shortcut_scale=2.0)
    sink = MemorySink()
    config = trial_config(exploding, "synthetic", resolve_recipe("smoke"), 0, subset=512)
    result = run_trial(config, sink=sink, threads=1)
    assert (result["status"], result["diverged_at"], result["iterations"]) == ("diverged", 0, 0)
    assert result["train_loss"] is None and result["divergence"]["iteration"] == 0
    assert math.isfinite(result["divergence"]["loss"]) and result["divergence"]["loss"] > 100 * math.log(10)
    assert "above 100·ln(10)" in result["divergence"]["reason"]
    assert sink.records[-1]["step"] == 0 and sink.records[-1]["test_error"] == result["test_error"]
    torch.manual_seed(0)
    initial = build_model(config.model)
    assert result["test_error"] == pytest.approx(scored_error(initial.state_dict(), config), abs=1e-9)


def scored_error(state, config):
    """The test error of a state, evaluated as the trainer evaluates."""
    data, (_, _, eval_x, eval_y, mean, scale) = device_data(config, torch.device("cpu"), None)
    model = build_model(config.model)
    model.load_state_dict(state)
    return evaluate(model.to(memory_format=torch.channels_last), eval_x, eval_y, mean, scale, False)[0][0]


def test_a_non_finite_loss_is_scored_in_the_last_finite_state(tmp_path, monkeypatch):
    """The diverging forward pass has already moved BN's running statistics (to NaN): the run is scored
    with the weights and the statistics from before it, which the checkpoint at that step holds."""
    real = trainer.seed_batch

    def poisoned(train_x, train_y, batches, seed, iteration, *rest):
        xb, yb = real(train_x, train_y, batches, seed, iteration, *rest)
        return (xb * float("inf") if iteration >= 35 else xb), yb

    monkeypatch.setattr(trainer, "seed_batch", poisoned)
    config = tiny_trial(0, checkpoint_every=5)
    result = run_trial(config, checkpoint_dir=tmp_path, threads=1)
    assert (result["status"], result["diverged_at"], result["divergence"]["loss"]) == ("diverged", 35, "nan")
    last_finite = torch.load(tmp_path / "ckpt-000000035.pt", weights_only=True)["model"]
    assert all(torch.isfinite(t).all() for t in last_finite.values())
    assert result["test_error"] == pytest.approx(scored_error(last_finite, config), abs=1e-9)
    assert result["test_error"] < 80.0  # a NaN-scored run predicts one class: 90% on 10 balanced classes


def test_nan_logits_count_as_errors():
    model = build_model(depth=8, block="basic", width=4)
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    x, y = torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.zeros(20, dtype=torch.long)
    assert evaluate(model, x, y, torch.zeros(3, 32, 32), 1.0, False) == [(100.0, None)]


def test_log_points_evaluations_and_live_points():
    sink = MemorySink()
    # log every 5 iterations, evaluate every 20 on 100 images (the last on all 1000), live points every step.
    config = tiny_trial(0, log_every=5, eval_images=100, log_every_s=1e-9)
    result = run_trial(config, sink=sink, threads=1)
    history = result["history"]
    assert [h["step"] for h in history] == list(range(5, 41, 5))
    assert [h["step"] for h in history if "test_error" in h] == [20, 40]
    assert [h["eval_images"] for h in history if "test_error" in h] == [100, 1000]
    assert {"train_loss", "train_error", "lr", "img_per_s"} <= set(history[0]) and "test_error" not in history[0]
    assert [r["step"] for r in sink.records] == list(range(1, 41))  # live points in between, in the sink only
    assert sink.records[-1]["test_error"] == result["test_error"] == history[-1]["test_error"]
    assert result["train_loss"] == history[-1]["train_loss"] and result["test_size"] == 1000
    assert result["precision"] == "fp32" and result["compiled"] is False and result["fused"] == 1


def test_default_cadence_is_about_one_percent():
    assert resolve_recipe("mini-cpu").log_interval == 8
    assert resolve_recipe("paper-cifar").log_interval == 640
    assert resolve_recipe("smoke").log_interval == 1


class ClockSink(MemorySink):
    def log(self, metrics, step):
        super().log({**metrics, "at": time.perf_counter()}, step)


def test_throughput_is_images_over_the_wall_time_of_its_window(tmp_path):
    """Checkpoints every 10 iterations fall inside the log windows: they count as time."""
    sink = ClockSink()
    run_trial(tiny_trial(0, log_every=10, checkpoint_every=10, eval_every=40), checkpoint_dir=tmp_path, sink=sink,
              threads=1)
    records = [r for r in sink.records if "img_per_s" in r]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    for before, after in zip(records[:2], records[1:3]):  # windows free of evaluations, both ends
        assert 10 * 32 / after["img_per_s"] == pytest.approx(after["at"] - before["at"], rel=0.05)


def test_auto_precision_follows_what_the_cpu_reports(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(trainer, "cpu_flags", lambda: {"avx2", "fma"})
    trainer.cpu_bf16_pays.cache_clear()
    assert trainer.resolve_precision("auto", cpu) == "fp32"
    assert trainer.resolve_precision("bf16", cpu) == "bf16" and trainer.resolve_precision("fp32", cpu) == "fp32"
    trainer.cpu_bf16_pays.cache_clear()


def test_bf16_trials_are_deterministic_and_resume_bit_for_bit(tmp_path):
    config = tiny_trial(0, precision="bf16", iterations=20, eval_every=10, checkpoint_every=10, milestones=[15])
    full = run_trial(config, checkpoint_dir=tmp_path / "a", threads=1)
    assert full["precision"] == "bf16" and full["status"] == "finished"
    again = run_trial(config, threads=1)
    assert (again["test_error"], again["train_loss"]) == (full["test_error"], full["train_loss"])
    run_trial(config, checkpoint_dir=tmp_path / "b", threads=1)
    (tmp_path / "b" / "result.json").unlink()
    checkpoints(tmp_path / "b")[0].unlink()  # back to iteration 10
    resumed = run_trial(config, checkpoint_dir=tmp_path / "b", threads=1)
    assert resumed["resumed_from"] == 10 and resumed["precision"] == "bf16"
    a = torch.load(tmp_path / "a" / "ckpt-000000020.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt-000000020.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    def broken(model):
        def call(x):
            raise RuntimeError("no C++ compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    eager = run_trial(tiny_trial(0), threads=1, compile_model=False)
    with pytest.warns(UserWarning, match="torch.compile failed .*no C\\+\\+ compiler here.*training eagerly"):
        fallback = run_trial(tiny_trial(0), threads=1, compile_model=True)
    assert fallback["compiled"] is False
    assert (fallback["test_error"], fallback["train_loss"]) == (eager["test_error"], eager["train_loss"])


# --- checkpoints -----------------------------------------------------------------------------------------------
def test_resume_from_checkpoint_equals_uninterrupted(tmp_path):
    full = run_trial(tiny_trial(0), threads=1)
    run_trial(tiny_trial(0, iterations=40), checkpoint_dir=tmp_path, threads=1)
    # Roll back to an intermediate checkpoint by deleting the result and the newer checkpoints, then resume.
    (tmp_path / "result.json").unlink()
    files = checkpoints(tmp_path)
    assert [f.name for f in files] == ["ckpt-000000040.pt", "ckpt-000000030.pt"]
    files[0].unlink()
    resumed = run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    assert resumed["resumed_from"] == 30
    assert (resumed["test_error"], resumed["train_loss"]) == (full["test_error"], full["train_loss"])
    assert (tmp_path / "result.json").exists()


def test_a_finished_trial_returns_its_stored_result(tmp_path):
    first = run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    assert run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1) == first


def test_a_result_cut_short_by_a_kill_is_never_left_truncated(tmp_path, monkeypatch):
    """A worker killed while writing result.json (its driver SIGKILLed) leaves no record rather than a truncated
    one; the trial then resumes from its last checkpoint to the same result."""
    first = run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    (tmp_path / "result.json").unlink()
    real_replace = os.replace

    def killed_at_the_result(src, dst):
        if os.path.basename(dst) == "result.json":
            raise SystemExit("killed")  # the bytes are written, the record not yet in place
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed_at_the_result)
    with pytest.raises(SystemExit):
        run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    assert not (tmp_path / "result.json").exists()
    monkeypatch.undo()
    again = run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    assert again["resumed_from"] == 40 and (again["test_error"], again["train_loss"]) == (
        first["test_error"], first["train_loss"])
    assert json.loads((tmp_path / "result.json").read_text())["test_error"] == first["test_error"]


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    (tmp_path / "result.json").unlink()
    newest, older = checkpoints(tmp_path)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        result = run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    assert result["resumed_from"] == 30


def test_all_checkpoints_corrupt_starts_over(tmp_path):
    run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1)
    (tmp_path / "result.json").unlink()
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
    (tmp_path / "result.json").unlink()
    checkpoints(tmp_path)[0].unlink()  # back to iteration 30
    with pytest.raises(TrialTimeout, match="time limit of 1e-09 s at iteration 30"):
        run_trial(tiny_trial(0), checkpoint_dir=tmp_path, threads=1, time_limit_s=1e-9)
    assert [f.name for f in checkpoints(tmp_path)] == ["ckpt-000000030.pt"]


def test_compile_is_chosen_by_the_trial_size_and_the_machine(monkeypatch):
    cpu, small = torch.device("cpu"), resolve_recipe("smoke")
    long = resolve_recipe("paper-cifar")
    macs = 41_000_000  # ResNet-20 on CIFAR
    assert trainer.should_compile(True, cpu, macs, small) and not trainer.should_compile(False, cpu, macs, long)
    monkeypatch.setattr(trainer, "cpu_flags", lambda: {"avx2"})
    assert not trainer.should_compile(None, cpu, macs, long)  # no gain measured on CPUs without bf16 units
    monkeypatch.setattr(trainer, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert trainer.should_compile(None, cpu, macs, long) and not trainer.should_compile(None, cpu, macs, small)
