"""k seeds of one trial as one network: the parts of a group that the training loop (workers/trainer.py)
needs to train k seeds side by side with, per seed, the same result as alone.

Why: a CIFAR ResNet at batch 128 leaves most of a large GPU idle (16–64 channels per layer, hundreds of
small kernels per step). Training k seeds side by side, as channel groups of one network
(`build_model(spec, groups=k)`, see ablations/resnet.py), makes every kernel k× larger at no cost in
statistics: each seed keeps its own initialisation, BN statistics, data order, augmentation and
optimizer state. A solo trial is the group of one.

What makes each seed equal to its solo trial:
- initialisation: seed s's slice is copied from `torch.manual_seed(s); build_model(spec)`, bit for bit;
- data: each seed gathers its own batch and augments it with its own (seed, iteration) generator; the k
  batches are stacked on the channel axis;
- loss: the sum over seeds of each seed's mean cross-entropy, so each slice gets its solo gradient;
- optimizer: SGD with momentum and weight decay is elementwise, so its state is per seed too;
- learning rate: one recipe, one rate per step for all seeds.
Not bit-identical to a group of another size: grouped convolutions, per-channel BN reductions over k× the
channels and the batched classifier sum in another order, so values differ in the last bits and the
differences grow with training (tests/test_fused.py measures them and sets the tolerance).
Not equal for the dropout shortcuts: masks are drawn for the whole group from the stream of (all seeds of
the group, iteration), so they are independent per seed and reproducible for the same group, but not the
masks of the solo trial (a group of one draws exactly the solo masks).

A seed that diverges stops alone: after it is scored, its slice is frozen at zero (`freeze`): parameters
and momentum zeroed, BN statistics reset, and its loss left out of the sum, so its gradient is exactly
zero and weight decay keeps it at zero; it computes finite nonsense that no other seed reads (no operation
mixes channel groups), for the same cost.

Checkpoints stay per seed, in the solo format (solo-shaped tensors), so any seed can be resumed alone or in
another group (`split_optimizer` / `join_optimizers`, `split_state` / `join_states`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from ablations import ModelSpec, build_model
from ablations.resnet import ResNet, join_states

from .config import TrialConfig


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
