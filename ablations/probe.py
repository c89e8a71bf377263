"""Propagation diagnostics (Eqn. 5-8): how the signal and the gradient travel through the units.

`probe_propagation` runs one forward/backward pass with hooks and leaves the model exactly as it found
it (parameters, their gradients, BN running statistics, train/eval mode), so the trainer can call it
during training as well as `ablate probe` at initialisation.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .units import GatedShortcut, ResidualUnit


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach().float()))


def probe_propagation(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Per unit ‖x_l‖ and ‖∂E/∂x_l‖ (norms over the whole batch), and ‖∂E/∂x_1‖ / ‖∂E/∂x_L‖.

    x_1 is the input of the first unit, x_L the output of the last; E the batch's cross-entropy with
    the model in training mode (batch statistics), as at the first iteration. `shortcut_factor` is the
    analytic Π E[h'] over the units (λ^units for constant scaling, 1 for identities, (1 − p)^units for the
    paper's dropout, whose keep-mask scales the shortcut by 1 − p in expectation) where every unit's
    E[h'] is a constant, else None; gated units report the mean of 1 − g(x) they applied.
    """
    units = [m for m in model.modules() if isinstance(m, ResidualUnit)]
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    gate_means: dict[int, float] = {}

    def keep_input(index):
        def hook(module, args):
            inputs.append(args[0])
        return hook

    def keep_gate(index):
        def hook(module, args, out):
            gate_means[index] = float((1.0 - torch.sigmoid(out.detach())).mean())
        return hook

    handles = [u.register_forward_pre_hook(keep_input(i)) for i, u in enumerate(units)]
    handles.append(units[-1].register_forward_hook(lambda m, a, out: outputs.append(out)))
    handles += [u.shortcut.gate.register_forward_hook(keep_gate(i))
                for i, u in enumerate(units) if isinstance(u.shortcut, GatedShortcut)]
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("weight", "bias"))}
    was_training = model.training
    model.train()
    try:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, inputs + outputs)
    finally:
        model.train(was_training)
        model.load_state_dict(buffers, strict=False)
        for h in handles:
            h.remove()
    gains = [u.shortcut.analytic_gain() for u in units]
    stage_of = [stage + 1 for stage, count in enumerate(model.spec.stages) for _ in range(count)]
    per_unit = []
    for i, (u, inp, grad) in enumerate(zip(units, inputs, grads)):
        per_unit.append({"unit": i + 1, "stage": stage_of[i], "x_norm": _norm(inp), "grad_norm": _norm(grad),
                         "shortcut_gain": gains[i], "gate_mean": gate_means.get(i)})
    last_grad = _norm(grads[-1])
    return {
        "loss": float(loss.detach()),
        "batch": int(x.shape[0]),
        "units": per_unit,
        "grad_ratio_first_last": per_unit[0]["grad_norm"] / last_grad if last_grad > 0 else math.inf,
        "shortcut_factor": math.prod(gains) if all(g is not None for g in gains) else None,
    }

