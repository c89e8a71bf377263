"""Trials on several workers: one Ray Train job (TorchTrainer, DistributedDataParallel) per trial.

A grid whose `resources.workers` is above 1 runs each trial this way instead of as one Ray task. The
scheduler still submits one Ray task per trial, `execute_distributed`, which asks for no resources itself:
it starts the job on the same cluster (`workers` ranks of `cpu` CPUs and `gpu` GPUs each; NCCL on GPUs,
gloo on CPUs), waits for it and returns the trial's result record. So the claim, the heartbeat, the retries,
the state row and the MLflow sync stay the scheduler's, as for every trial.

Every rank runs the one training loop (workers/trainer.py, `run_trials(..., distributed=True)`): DDP wraps
the model, and each rank's batch source yields its shard of the global batch (workers/sources.py). Rank 0
writes the checkpoints, in the solo format, and the result record into the trial's checkpoint folder, and
logs live to the trial's MLflow child run through the same sink as a one-worker trial (tracking.live_sink);
the other ranks log nowhere.

Failures: Ray Train restarts nothing here (`FailureConfig(max_failures=0)`). A killed rank or node fails
the job, this task raises, and the scheduler's own retry submits the trial again, which resumes from rank
0's last checkpoint. Ray Train's restarts would do the same work but out of Ablate's sight: the state
store would count one attempt where there were several, and `max_retries` would mean two different
budgets for single-device and multi-worker trials. One retry policy serves both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.sinks import NullSink

from .tracking import dataset_inputs, live_sink


def execute_distributed(task: dict[str, Any]) -> dict[str, Any]:
    """The Ray task body of a multi-worker trial: its Ray Train job, run to the end; rank 0's result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from workers.checkpoint import stored_result
    from workers.config import TrialConfig

    resources = task["resources"]
    gpu = resources["gpu"] > 0
    folder = Path(task["checkpoint_dir"])
    trainer = TorchTrainer(
        _train_rank, train_loop_config=task,
        scaling_config=ScalingConfig(num_workers=resources["workers"], use_gpu=gpu,
                                     resources_per_worker={"CPU": resources["cpu"], **({"GPU": 1} if gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        # Ray Train's own records of the job, beside the trial's checkpoints (a path every node can read).
        run_config=RunConfig(name="ray-train", storage_path=str(folder), failure_config=FailureConfig(max_failures=0)))
    trainer.fit()  # raises when a rank failed: the scheduler retries the trial
    config = TrialConfig.model_validate_json(task["config"])
    result = stored_result(folder, config.model_dump(mode="json"))
    if result is None:
        raise RuntimeError(f"the Ray Train job ended without a result in {folder}")
    result["inputs"] = dataset_inputs(config, task.get("data_dir"))
    return result


def _train_rank(task: dict[str, Any]) -> None:
    """One rank of the job: the trial's loop in this process, rank 0 logging to the trial's child run."""
    import ray.train
    import ray.train.torch
    from workers.config import TrialConfig
    from workers.trainer import run_trials

    config = TrialConfig.model_validate_json(task["config"])
    sink = None
    if ray.train.get_context().get_world_rank() == 0:
        sink = live_sink(task, dataset_inputs(config, task.get("data_dir")))
    device = ray.train.torch.get_device() if task["resources"]["gpu"] > 0 else "cpu"
    run_trials([config], checkpoint_dirs=[task["checkpoint_dir"]], sinks=[sink or NullSink()], threads=task["threads"],
               device=device, data_dir=task.get("data_dir"), time_limit_s=task.get("timeout_s"), distributed=True)
