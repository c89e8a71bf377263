"""Trials on several workers: the one loop under DistributedDataParallel (gloo on CPU), each rank training
on its shard of the global batch; and on Ray Train through the scheduler, killed and resumed.

The reference 2-worker runs here start their ranks as `ablate train --workers 2` does (workers/launch.py),
not through Ray Train: the loop only needs an initialised process group, and gloo sums two ranks' gradients
exactly (a + b = b + a in floating point), so either launcher gives the same run bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ablations import build_model
from orchestrator.grids import expand_grid, load_grid
from orchestrator.state import StateStore
from orchestrator.tracking import Tracker
from tests.helpers import ROOT, ablate, wait_for
from workers.config import TrialConfig
from workers.launch import run_workers
from workers.recipes import resolve_recipe
from workers.sources import Shard
from workers.trainer import DeviceData, run_trials, trial_config

NET = dict(depth=8, block="basic", width=8)
# Batch 64 on 2 workers: 32 per BN, as the paper's 128 on 2 GPUs is 64 per BN. Long enough (40 steps) that
# a rank is killed mid-run however fast the machine: it dies within a poll of the first checkpoint (8).
RECIPE = dict(iterations=40, batch_size=64, milestones=[30], eval_every=20, checkpoint_every=8, log_every=1,
              augment=True)
GRID = {"name": "ddp", "dataset": "fashion-mnist", "subset": 2048, "recipe": {"base": "smoke", **RECIPE},
        "depths": [8], "block": "basic", "width": 8, "variants": ["original"], "seeds": [0],
        "resources": {"workers": 2, "cpu": 1}, "max_retries": 2}


def config(workers: int) -> TrialConfig:
    base = trial_config(NET, "fashion-mnist", resolve_recipe("smoke", RECIPE), seed=0, subset=2048)
    return TrialConfig(**{**base.model_dump(), "workers": workers})


def curve(result: dict) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "img_per_s"} for h in result["history"]]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """An uninterrupted 2-worker run: its folder and rank 0's result."""
    folder = tmp_path_factory.mktemp("two")
    return folder, run_workers(config(2), checkpoint_dir=folder, threads=1)


def test_a_two_worker_trial_resumes_as_it_ran(two_workers, tmp_path):
    folder, result = two_workers
    assert result["status"] == "finished" and result["config"]["workers"] == 2
    saved = json.loads((folder / "result.json").read_text())  # rank 0 wrote it
    assert curve(saved) == curve(result)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "ckpt-000000032.pt").write_bytes((folder / "ckpt-000000032.pt").read_bytes())
    resumed = run_workers(config(2), checkpoint_dir=copy, threads=1)
    assert resumed["resumed_from"] == 32 and curve(resumed) == curve(result)
    assert resumed["test_error"] == result["test_error"]


def test_one_worker_of_the_same_global_batch_differs_by_bn_alone(two_workers, tmp_path):
    """1 worker × 64 against 2 workers × 32: the same initial weights, images, crops and flips, and the
    gradient of the global batch's mean loss either way. What differs is BN: in training it normalises by
    the statistics of the images on its device, 64 against 32 (the paper's per-GPU BN). Step 1 shows it
    alone: the 1-worker loss is the network's loss on all 64 images, the 2-worker one the mean of its
    losses on each half, each half normalised by its own statistics, recomputed here from the initial
    network. From there on the weights drift apart, and so do the curves."""
    _, two = two_workers
    one = run_trials([config(1)], threads=1)[0]
    first = config(1)
    torch.manual_seed(first.seed)
    net = build_model(first.model).to(memory_format=torch.channels_last).train()
    x, y = DeviceData(first, torch.device("cpu"), None, [first.seed], None).train_batch(0, 0)
    with torch.no_grad():
        whole = F.cross_entropy(net(x), y).item()
        halves = sum(F.cross_entropy(net(x[part]), y[part]).item()
                     for part in (Shard(0, 2).part(64), Shard(1, 2).part(64))) / 2
    assert one["history"][0]["train_loss"] == pytest.approx(whole, rel=1e-5)
    assert two["history"][0]["train_loss"] == pytest.approx(halves, rel=1e-5)
    assert abs(whole - halves) > 1e-4
    assert one["history"][-1]["train_loss"] != two["history"][-1]["train_loss"]
    # Both learn: test errors below chance (90%) after 40 steps.
    assert one["test_error"] < 80 and two["test_error"] < 80


def test_bad_worker_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="batch_size 64 does not split into 3 equal shards"):
        config(3)
    with pytest.raises(ValueError, match="sync_bn only means something with several workers"):
        trial_config(NET, "fashion-mnist", resolve_recipe("smoke", {**RECIPE, "sync_bn": True}), seed=0)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def ranks_of(pid: int) -> list[int]:
    """The Ray Train worker processes (one per rank) started under `pid`."""
    out = []
    for p in descendants(pid):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{p}/cmdline").read_bytes():
                out.append(p)
        except OSError:
            pass
    return out


@pytest.mark.slow
def test_a_ray_train_trial_killed_mid_run_resumes_to_the_same_result(two_workers, tmp_path, mlflow_server):
    """`resources.workers: 2` runs the trial as a Ray Train job of two gloo ranks. One rank is SIGKILLed
    once the first checkpoint is on disk: the job fails, the scheduler retries the trial, and the new job
    resumes from rank 0's checkpoint to the result of the uninterrupted run. MLflow holds one child run
    with one metric stream (rank 0's)."""
    _, reference = two_workers
    home = tmp_path / "home"
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps(GRID))
    (trial,) = expand_grid(load_grid(GRID))
    assert trial.key == config(2).key()
    env = {**os.environ, "ABLATE_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server.uri}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(grid_file), "--json"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        first = home / "checkpoints" / trial.key / "ckpt-000000008.pt"
        assert wait_for(lambda: first.exists() or proc.poll() is not None, 900, every=0.05), "no checkpoint"
        ranks = ranks_of(proc.pid)
        assert len(ranks) == 2, f"expected two rank processes, found {ranks}"
        os.kill(max(ranks), signal.SIGKILL)
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out)["counts"]["finished"] == 1

    store = StateStore(f"sqlite:///{home / 'state.db'}")
    (row,) = store.grid_trials(load_grid(GRID).grid_id())
    result = row["result"]
    assert [a.outcome for a in store.attempts(trial.key)] == ["error", "finished"]
    assert result["resumed_from"] >= 8 and curve(result) == curve(reference)
    assert result["test_error"] == reference["test_error"] == row["test_error"]

    client = Tracker(mlflow_server.uri).client
    experiment = client.get_experiment_by_name("ddp").experiment_id
    (child,) = client.search_runs([experiment], f"tags.`ablate.trial` = '{trial.key}'")
    assert child.info.run_id == row["mlflow_run_id"] and child.info.status == "FINISHED"
    points = client.get_metric_history(child.info.run_id, "train_loss")
    logged = {h["step"]: h["train_loss"] for h in result["history"]}
    assert {p.step for p in points} == set(logged)
    assert all(p.value == pytest.approx(logged[p.step], rel=1e-6) for p in points)
    # Steps up to the checkpoint resumed from were logged once: by rank 0 alone, not by every rank (the
    # steps after it may appear twice, from the killed attempt and from its retry, equal).
    early = [p.step for p in points if p.step <= result["resumed_from"]]
    assert sorted(early) == list(range(1, result["resumed_from"] + 1))


@pytest.mark.parametrize("args,needle", [
    (["--workers", "3"], "batch_size 64 does not split into 3 equal shards"),
    (["--workers", "0"], "--workers must be positive"),
    (["--workers", "2", "--device", "cuda"], "2 workers on CUDA need as many GPUs"),
])
def test_ablate_train_workers_bad_input_is_one_line(args, needle):
    if "cuda" in args and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    out = ablate("train", "--dataset", "synthetic", "--depth", "8", "--block", "basic", "--width", "4",
                 "--recipe", "smoke", "--set", "batch_size=64", "--subset", "256", *args)
    assert out.code == 2 and needle in out.err and len(out.err.strip().splitlines()) == 1
