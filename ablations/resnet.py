"""The residual network: stem, stages of units, head. One builder for every variant, on either plan.

The plan (spec.plan, picked by the dataset) decides only the stem and the stage layout; every stage is
built from the same ResidualUnit:
- `cifar`: conv3×3 → three stages of n units (He et al. 2015, §4.2);
- `imagenet`: conv7×7/2 → BN-ReLU → max-pool 3×3/2 → four stages (He et al. 2015, Table 1), the stem the
  same for every placement (fb.resnet.torch resnet.lua and preresnet.lua). The unit keeps its stride on
  F's first convolution, as the original models: 3.8 GMACs for ResNet-50, 11.3 for ResNet-152 (He et al.
  2015, Table 1). fb.resnet.torch and torchvision stride the 3×3 instead: the same parameters, more MACs.

`groups=k` builds k independent copies of the network as one (see units.py): the input is the copies'
images stacked on the channel axis, [B, k·C, H, W], and the output their logits side by side,
[B, k·classes]. Layout contract: every parameter and buffer of the k-copy network is the k copies'
tensors concatenated on dim 0 (BN's scalar batch counter is shared), so `join_states` and `split_state`
convert between k solo state dicts and one grouped one, and copy g computes exactly what a solo
network with copy g's weights computes.
"""
from __future__ import annotations

import torch
from torch import nn

from .spec import ModelSpec, make_spec, variant_fields
from .units import EXPANSION, PLACEMENTS, ResidualUnit, conv, tokens_to_modules


class ResNet(nn.Module):
    """stem → stages of units (stride 2 at the start of every stage but the first) → [final activation] →
    pool → linear.

    Stage output widths: w·2^s for the basic and single blocks, 4w·2^s for the bottleneck (inner widths
    w·2^s), w = spec.width (16 in the CIFAR papers, 64 on ImageNet).
    """

    def __init__(self, spec: ModelSpec, groups: int = 1):
        super().__init__()
        self.spec, self.groups = spec, groups
        placement = PLACEMENTS[spec.unit]
        w = spec.width
        imagenet = spec.plan == "imagenet"
        if imagenet:
            # The first unit then reads an activated input and has no leading activation ('no_preact').
            stem: list[nn.Module] = [conv(spec.in_channels, w, 7, 2, groups=groups),
                                     *tokens_to_modules(("bn", "relu"), w, groups), nn.MaxPool2d(3, 2, 1)]
        else:
            # Pre-activation nets start with a bare convolution: the first unit activates it before the
            # split. The others use the original conv-BN-ReLU stem.
            stem = [conv(spec.in_channels, w, 3, groups=groups)]
            if not placement.leading:
                stem += tokens_to_modules(("bn", "relu"), w, groups)
        self.stem = nn.Sequential(*stem)
        units, in_ch = [], w
        for stage, count in enumerate(spec.stages):
            out_ch = w * (2 ** stage) * EXPANSION[spec.block]
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                units.append(ResidualUnit(in_ch, out_ch, stride, spec, first=not units, groups=groups,
                                          activated=imagenet and not units))
                in_ch = out_ch
        self.units = nn.Sequential(*units)
        # After the last addition, pre-activation nets apply their activation once more before pooling
        # (the extra BN-ReLU of resnet-pre-act.lua): the "next unit" that never comes.
        self.head = nn.Sequential(*tokens_to_modules(placement.leading, in_ch, groups))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = GroupedLinear(in_ch, spec.num_classes, groups)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class GroupedLinear(nn.Linear):
    """k independent linear layers side by side: [B, k·in] → [B, k·out]. The weight is the k layers'
    weights stacked on dim 0, as a grouped convolution's; with k = 1 it is exactly nn.Linear."""

    def __init__(self, in_features: int, out_features: int, groups: int = 1):
        super().__init__(in_features, groups * out_features)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return super().forward(x)
        k = self.groups
        # One batched matrix product over the copies: [k, B, in] @ [k, in, out] + [k, 1, out].
        y = torch.baddbmm(self.bias.view(k, 1, -1), x.unflatten(1, (k, -1)).transpose(0, 1),
                          self.weight.view(k, -1, self.in_features).transpose(1, 2))
        return y.transpose(0, 1).flatten(1)


def build_model(spec: ModelSpec | None = None, *, groups: int = 1, **fields) -> ResNet:
    """A ResNet from a spec, or from loose fields (`variant="full_preact", depth=110`); `groups=k`
    holds k independent copies of it (workers/fused.py trains k seeds that way)."""
    if spec is None:
        if "variant" in fields:
            fields = {**variant_fields(fields.pop("variant")), **fields}
        spec = make_spec(**fields)
    if groups < 1:
        raise ValueError(f"groups must be at least 1, got {groups}")
    return ResNet(spec, groups)


def join_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """k solo state dicts (same spec) as the state dict of the k-copy network: tensors concatenated on
    dim 0 in the given order; scalars (BN's batch counter) must agree and are kept once."""
    joined = {}
    for key, first in states[0].items():
        if first.dim() == 0:
            if any(not torch.equal(s[key], first) for s in states[1:]):
                raise ValueError(f"{key} differs between the copies: {[int(s[key]) for s in states]}")
            joined[key] = first.clone()
        else:
            joined[key] = torch.cat([s[key] for s in states])
    return joined


def split_state(state: dict[str, torch.Tensor], groups: int) -> list[dict[str, torch.Tensor]]:
    """The state dict of a k-copy network as k solo state dicts (cloned, so they outlive training)."""
    return [{key: t.clone() if t.dim() == 0 else t.chunk(groups)[g].clone() for key, t in state.items()}
            for g in range(groups)]


def count_params(model: nn.Module) -> int:
    """All trainable parameters, BN's affine weights included (running statistics are buffers)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int) -> int:
    """Forward multiply-accumulates for one image: convolutions and the linear layer, measured by hooks."""
    total = 0

    def on_conv(m: nn.Conv2d, inputs, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def on_linear(m: nn.Linear, inputs, out):
        nonlocal total
        total += out.numel() * m.in_features

    handles = [m.register_forward_hook(on_conv) for m in model.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(on_linear) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, model.stem[0].in_channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
