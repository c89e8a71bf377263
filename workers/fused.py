"""k seeds of one trial trained as one network: per seed the same result as its solo trial, k× the work
per kernel launch.

Why: a CIFAR ResNet at batch 128 leaves most of a large GPU idle (16–64 channels per layer, hundreds of
small kernels per step). Training k seeds side by side, as channel groups of one network
(`build_model(spec, groups=k)`, see ablations/resnet.py), makes every kernel k× larger at no cost in
statistics: each seed keeps its own initialisation, BN statistics, data order, augmentation and
optimizer state.

What makes each seed equal to its solo trial (workers/trainer.py):
- initialisation: seed s's slice is copied from `torch.manual_seed(s); build_model(spec)`, bit for bit;
- data: each seed gathers its own batch (`Batches(n, batch, seed)`) and augments it with its own
  (seed, iteration) generator, exactly as run_trial; the k batches are stacked on the channel axis;
- loss: the sum over seeds of each seed's mean cross-entropy, so each slice gets its solo gradient;
- optimizer: SGD with momentum and weight decay is elementwise, so its state is per seed too;
- learning rate: one recipe, one rate per step for all seeds.
Not bit-identical: grouped convolutions, per-channel BN reductions over k× the channels and the batched
classifier sum in another order than the solo kernels, so values differ in the last bits and the
differences grow with training (tests/test_fused.py measures them and sets the tolerance).
Not equal for the dropout shortcut: its masks are drawn for the whole group from the stream of
(all seeds of the group, iteration), so they are independent per seed and reproducible for the same
group, but not the masks of the solo trial (a group of one draws exactly the solo masks).

Divergence: a seed whose loss is not finite is stopped alone, as run_trial stops: its update is not
applied, its last finite weights (with the BN statistics of the diverging forward pass, as in run_trial)
are evaluated, and its result.json is written at once. Its slice is then frozen at zero: parameters and
momentum zeroed, BN statistics reset, and its loss left out of the sum, so its gradient is exactly zero
and weight decay keeps it at zero; it computes finite nonsense that no other seed reads (no operation
mixes channel groups), for the same cost. The others continue.

Checkpoints stay per seed, in the solo format (`ckpt-<iteration>.pt` in each seed's folder, same keys,
solo-shaped tensors), so any seed can also be resumed by run_trial alone. Resuming a group:
- a seed whose folder holds a result.json of its configuration (finished or diverged) is not trained
  again: its stored record is returned;
- the others resume from the newest iteration for which every one of them has a readable checkpoint
  (checkpoints are written for all seeds at the same steps, so this is the last one unless the process
  died between two seeds' writes); when they share none, the group starts from iteration 0, with a
  warning.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ablations import ModelSpec, build_model
from ablations.resnet import ResNet, join_states, split_state

from .checkpoint import prepare_dir, readable, save_checkpoint
from .sinks import MetricsSink, NullSink
from .trainer import (EVAL_BATCH, STREAM_AUGMENT, STREAM_STEP, Batches, TrialConfig, TrialTimeout, _stream_seed,
                      augment, device_data, evaluate, normalise, pick_device)


def check_group(configs: list[TrialConfig]) -> list[int]:
    """The seeds of a group that may train fused: distinct seeds, everything else identical."""
    if not configs:
        raise ValueError("a fused group needs at least one trial configuration")
    base = configs[0].model_dump(mode="json")
    for config in configs[1:]:
        other = config.model_dump(mode="json")
        differ = sorted(k for k in base if k != "seed" and base[k] != other[k])
        if differ:
            raise ValueError(f"fused trials must differ only in the seed; seed {config.seed} differs from seed "
                             f"{configs[0].seed} in {', '.join(differ)}")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"fused trials need distinct seeds, got {seeds}")
    return seeds


def fused_model(spec: ModelSpec, seeds: list[int]) -> ResNet:
    """The k-copy network whose copy j starts exactly where seed j's solo trial starts."""
    solo_states = []
    for seed in seeds:
        torch.manual_seed(seed)  # as run_trial: the initialisation is a function of the seed alone
        solo_states.append(build_model(spec).state_dict())
    model = build_model(spec, groups=len(seeds))
    model.load_state_dict(join_states(solo_states))
    return model


def seed_batch(train_x: torch.Tensor, train_y: torch.Tensor, batches: Batches, seed: int, iteration: int,
               mean: torch.Tensor, scale: float, augmented: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One seed's training batch at one iteration: the images and labels its solo trial trains on."""
    idx = batches.indices(iteration).to(train_x.device)
    xb = normalise(train_x[idx], mean, scale)
    if augmented:
        xb = augment(xb, torch.Generator().manual_seed(_stream_seed(seed, STREAM_AUGMENT, iteration)))
    return xb.contiguous(memory_format=torch.channels_last), train_y[idx]


@torch.no_grad()
def evaluate_groups(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, scale: float,
                    autocast: bool) -> list[tuple[float, float]]:
    """(error %, mean loss) of every copy in evaluation mode, each on the same images."""
    k = model.groups
    model.eval()
    wrong, loss = torch.zeros(k, device=x.device), torch.zeros(k, device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        xb = normalise(x[i:i + EVAL_BATCH], mean, scale).repeat(1, k, 1, 1)
        xb = xb.contiguous(memory_format=torch.channels_last)
        yb = y[i:i + EVAL_BATCH, None].expand(-1, k)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(xb).float().unflatten(1, (k, -1))  # [B, k, classes]
        wrong += (logits.argmax(2) != yb).sum(0)
        loss += F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").sum(0)
    model.train()
    return [(100.0 * w / len(x), s / len(x)) for w, s in zip(wrong.tolist(), loss.tolist())]


def split_optimizer(state: dict[str, Any], groups: int) -> list[dict[str, Any]]:
    """A fused SGD state dict as k solo ones: momentum buffers cut on dim 0 like their parameters."""
    return [{"state": {i: {name: t.chunk(groups)[g].clone() if torch.is_tensor(t) and t.dim() else t
                           for name, t in per_param.items()} for i, per_param in state["state"].items()},
             "param_groups": copy.deepcopy(state["param_groups"])} for g in range(groups)]


def join_optimizers(states: list[dict[str, Any]]) -> dict[str, Any]:
    """k solo SGD state dicts (same parameters, same step) as the fused one."""
    first = states[0]
    joined = {i: {name: torch.cat([s["state"][i][name] for s in states]) if torch.is_tensor(t) and t.dim() else t
                  for name, t in per_param.items()} for i, per_param in first["state"].items()}
    return {"state": joined, "param_groups": copy.deepcopy(first["param_groups"])}


def readable_checkpoints(folder: Path, config: dict[str, Any], device: torch.device) -> dict[int, dict[str, Any]]:
    """Every readable checkpoint of this configuration in the folder, by iteration (as run_trial reads them)."""
    return {int(state["iteration"]): state for state in readable(folder, config, device)}


def stored_result(folder: Path | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """The result.json a previous run wrote for this configuration, if any."""
    if folder is None or not (folder / "result.json").is_file():
        return None
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("config") == config and result.get("status") in ("finished", "diverged") else None


def run_fused(configs: list[TrialConfig], *, checkpoint_dirs: list[str | os.PathLike] | None = None,
              sinks: list[MetricsSink] | None = None, device: str | torch.device | None = None,
              threads: int | None = None, data_dir: str | None = None,
              compile_model: bool | None = None, time_limit_s: float | None = None) -> list[dict[str, Any]]:
    """Train the seeds of one trial together; one result record per config, in order, as run_trial's
    (same keys, plus `fused`: the number of seeds trained together). `checkpoint_dirs` and `sinks`, when
    given, have one entry per config, as run_trial's `checkpoint_dir` and `sink`."""
    seeds = check_group(configs)
    for name, given in (("checkpoint_dirs", checkpoint_dirs), ("sinks", sinks)):
        if given is not None and len(given) != len(configs):
            raise ValueError(f"{name} has {len(given)} entries for {len(configs)} configs")
    base = configs[0]
    recipe, spec = base.recipe, base.model
    device = pick_device(device)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    cuda = device.type == "cuda"
    folders = [prepare_dir(d) for d in checkpoint_dirs] if checkpoint_dirs is not None else [None] * len(configs)
    sinks = list(sinks) if sinks is not None else [NullSink() for _ in configs]
    records = [c.model_dump(mode="json") for c in configs]

    results: dict[int, dict[str, Any]] = {}
    for i, (folder, record) in enumerate(zip(folders, records)):
        if (stored := stored_result(folder, record)) is not None:
            results[i] = stored
            sinks[i].close()
    todo = [i for i in range(len(configs)) if i not in results]
    if not todo:
        return [results[i] for i in range(len(configs))]
    k = len(todo)

    data, (train_x, train_y, eval_x, eval_y, mean, scale) = device_data(base, device, data_dir)

    model = fused_model(spec, [seeds[i] for i in todo]).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    start, resumed_from = 0, None
    histories: list[list[dict[str, Any]]] = [[] for _ in todo]
    windows = [[0.0, 0.0, 0] for _ in todo]
    if folders[todo[0]] is not None:
        found = [readable_checkpoints(folders[i], records[i], device) for i in todo]
        common = set.intersection(*(set(f) for f in found))
        if common:
            start = resumed_from = max(common)
            states = [f[start] for f in found]
            model.load_state_dict(join_states([s["model"] for s in states]))
            optimizer.load_state_dict(join_optimizers([s["optimizer"] for s in states]))
            histories = [list(s["history"]) for s in states]
            windows = [list(s["window"]) for s in states]
        elif any(found):
            warnings.warn(f"the seeds {[seeds[i] for i in todo]} share no checkpoint iteration: the group starts "
                          f"from iteration 0", stacklevel=2)
    forward = torch.compile(model) if (cuda if compile_model is None else compile_model) else model
    batches = [Batches(len(train_x), recipe.batch_size, seeds[i]) for i in todo]
    todo_seeds = [seeds[i] for i in todo]

    active = list(range(k))  # slots still training; slot j is config todo[j]
    window_start, window_images = time.perf_counter(), 0
    deadline = time.monotonic() + time_limit_s if time_limit_s else math.inf
    model.train()
    for it in range(start, recipe.iterations):
        if time.monotonic() > deadline:
            raise TrialTimeout(f"the fused trial ran past its time limit of {time_limit_s:g} s at iteration {it}")
        parts = [seed_batch(train_x, train_y, batches[j], todo_seeds[j], it, mean, scale, recipe.augment)
                 for j in range(k)]
        xb = torch.cat([p[0] for p in parts], 1).contiguous(memory_format=torch.channels_last)  # [B, k·C, H, W]
        yb = torch.stack([p[1] for p in parts], 1)  # [B, k]
        lr = recipe.lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(_stream_seed(*todo_seeds, STREAM_STEP, it))  # dropout shortcuts draw from here
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = forward(xb).float().unflatten(1, (k, -1))  # [B, k, classes]
            losses = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(0)  # [k]
        wrong = (logits.detach().argmax(2) != yb).sum(0)
        loss_values, wrong_counts = torch.stack([losses.detach(), wrong.float()]).tolist()  # one sync per step
        stopped = [j for j in active if not math.isfinite(loss_values[j])]
        if stopped:
            # As run_trial: the update is not applied; the last finite weights are evaluated alone.
            solo = split_state(model.state_dict(), k)
            for j in stopped:
                i = todo[j]
                test_error, test_loss = evaluate_alone(spec, solo[j], device, eval_x, eval_y, mean, scale, cuda)
                sinks[i].log({"test_error": test_error, "test_loss": test_loss}, step=it)
                sinks[i].close()
                results[i] = result_record(configs[i], records[i], folders[i], "diverged", test_error, it,
                                           histories[j], resumed_from, data.val is not None, device, k)
                active.remove(j)
        if not active:
            break
        total = losses[active].sum() if len(active) < k else losses.sum()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if stopped:
            freeze(model, optimizer, stopped, k)
        for j in active:
            windows[j][0] += loss_values[j] * recipe.batch_size
            windows[j][1] += wrong_counts[j]
            windows[j][2] += recipe.batch_size
        window_images += recipe.batch_size
        done = it + 1
        if done % recipe.eval_every == 0 or done == recipe.iterations:
            elapsed = time.perf_counter() - window_start
            evals = evaluate_groups(model, eval_x, eval_y, mean, scale, cuda)
            for j in active:
                w = windows[j]
                record = {"train_loss": w[0] / w[2], "train_error": 100.0 * w[1] / w[2],
                          "test_error": evals[j][0], "test_loss": evals[j][1], "lr": lr,
                          # each seed's own images per second; the group's throughput is k× this
                          "img_per_s": window_images / elapsed if elapsed > 0 else 0.0}
                histories[j].append({"step": done, **record})
                sinks[todo[j]].log(record, step=done)
                windows[j] = [0.0, 0.0, 0]
            window_images = 0
            window_start = time.perf_counter()
        if folders[todo[0]] is not None and (done % recipe.checkpoint_every == 0 or done == recipe.iterations):
            models, optims = split_state(model.state_dict(), k), split_optimizer(optimizer.state_dict(), k)
            for j in active:
                save_checkpoint(folders[todo[j]], done, {"config": records[todo[j]], "model": models[j],
                                                         "optimizer": optims[j], "history": histories[j],
                                                         "window": windows[j]})
            window_start = time.perf_counter()

    for j in active:
        i = todo[j]
        sinks[i].close()
        results[i] = result_record(configs[i], records[i], folders[i], "finished", histories[j][-1]["test_error"],
                                   None, histories[j], resumed_from, data.val is not None, device, k)
    return [results[i] for i in range(len(configs))]


def evaluate_alone(spec: ModelSpec, state: dict[str, torch.Tensor], device: torch.device, x: torch.Tensor,
                   y: torch.Tensor, mean: torch.Tensor, scale: float, autocast: bool) -> tuple[float, float]:
    """A stopped seed's (error %, loss) from its own slice, in a solo network: its result no longer
    depends on the group."""
    solo = build_model(spec)
    solo.load_state_dict(state)
    return evaluate(solo.to(device, memory_format=torch.channels_last), x, y, mean, scale, autocast)


@torch.no_grad()
def freeze(model: torch.nn.Module, optimizer: torch.optim.Optimizer, slots: list[int], k: int) -> None:
    """Zero the slices of stopped seeds: weights, BN statistics (variance 1) and momentum. With their loss
    left out of the sum their gradient is exactly zero from now on, so they stay zero and finite."""
    for p in model.parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        for j in slots:
            p.chunk(k)[j].zero_()
            if buf is not None:
                buf.chunk(k)[j].zero_()
    for name, b in model.named_buffers():
        if b.dim():
            for j in slots:
                b.chunk(k)[j].fill_(1.0 if name.endswith("running_var") else 0.0)


def result_record(config: TrialConfig, record: dict[str, Any], folder: Path | None, status: str, test_error: float,
                  diverged_at: int | None, history: list[dict[str, Any]], resumed_from: int | None,
                  validation: bool, device: torch.device, k: int) -> dict[str, Any]:
    """run_trial's result record for one seed (written to its folder as result.json), plus `fused`."""
    finished = status == "finished"
    result = {
        "key": config.key(), "status": status, "test_error": test_error,
        "train_loss": history[-1]["train_loss"] if finished else None,
        "train_error": history[-1]["train_error"] if history and finished else None,
        "iterations": config.recipe.iterations if finished else diverged_at, "diverged_at": diverged_at,
        "resumed_from": resumed_from, "evaluated_on": "validation" if validation else "test",
        "device": str(device), "history": history, "config": record, "fused": k,
    }
    if folder is not None:
        (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result
