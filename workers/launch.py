"""Several workers of one trial on this machine, without Ray: `ablate train --workers N`, the tests and
bench/workers.py. (Grids run such trials as Ray Train jobs: orchestrator/distributed.py.)

Each rank is a process started here (torch.multiprocessing, spawn) that joins a process group (gloo on CPU,
NCCL with one GPU per rank, cuda:rank) and runs the one training loop with `distributed=True`: the same run,
bit for bit on CPU, as the same ranks under Ray Train.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import TrialConfig
from .sinks import JsonLinesSink, NullSink


class LaunchError(ValueError):
    """The ranks cannot start here (fewer GPUs than workers); one line."""


def run_workers(config: TrialConfig, *, checkpoint_dir: str | os.PathLike | None = None, threads: int | None = None,
                device: str | None = None, log: bool = False, **options) -> dict[str, Any]:
    """Train `config` on its `workers` ranks, each a process with `threads` CPU threads (default: the cores
    shared out); rank 0's result record. `log`: rank 0 writes its metrics as JSON lines on standard error.
    `options` go to every rank's `run_trials` (data_dir, compile_model, time_limit_s)."""
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and torch.cuda.device_count() < config.workers:
        raise LaunchError(f"{config.workers} workers on CUDA need as many GPUs; this machine has "
                          f"{torch.cuda.device_count()}")
    threads = threads or max(1, (os.cpu_count() or 1) // config.workers)
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="ablate-ranks-") as scratch:
        out = Path(scratch) / "result.json"
        launch = dict(checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), threads=threads,
                      cuda=cuda, log=log, port=port, out=str(out))
        torch.multiprocessing.spawn(_rank, args=(config.model_dump_json(), launch, options), nprocs=config.workers)
        return json.loads(out.read_text())


def _rank(rank: int, config_json: str, launch: dict[str, Any], options: dict[str, Any]) -> None:
    import torch.distributed as dist

    from .trainer import run_trials
    config = TrialConfig.model_validate_json(config_json)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch["port"]))
    dist.init_process_group("nccl" if launch["cuda"] else "gloo", rank=rank, world_size=config.workers)
    try:
        sink = JsonLinesSink() if launch["log"] and rank == 0 else NullSink()
        folder = launch["checkpoint_dir"]
        result = run_trials([config], checkpoint_dirs=None if folder is None else [folder], sinks=[sink],
                            threads=launch["threads"], device=f"cuda:{rank}" if launch["cuda"] else "cpu",
                            distributed=True, **options)[0]
        if rank == 0:
            Path(launch["out"]).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
