"""The CIFAR residual network: stem, three stages of units, head. One builder for every variant."""
from __future__ import annotations

import torch
from torch import nn

from .spec import ModelSpec, make_spec, variant_fields
from .units import EXPANSION, PLACEMENTS, ResidualUnit, conv, tokens_to_modules


class ResNet(nn.Module):
    """conv3×3 → 3 stages of n units (stride 2 at stages 2 and 3) → [final activation] → pool → linear.

    Stage output widths: w, 2w, 4w for the basic block; 4w, 8w, 16w for the bottleneck (inner widths
    w, 2w, 4w), w = spec.width (16 in the papers).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        placement = PLACEMENTS[spec.unit]
        w = spec.width
        # Pre-activation nets start with a bare convolution: the first unit activates it before the
        # split. The others use the original conv-BN-ReLU stem.
        stem: list[nn.Module] = [conv(spec.in_channels, w, 3)]
        if not placement.leading:
            stem += tokens_to_modules(("bn", "relu"), w)
        self.stem = nn.Sequential(*stem)
        units, in_ch = [], w
        for stage in range(3):
            out_ch = w * (2 ** stage) * EXPANSION[spec.block]
            for i in range(spec.n):
                stride = 2 if stage > 0 and i == 0 else 1
                units.append(ResidualUnit(in_ch, out_ch, stride, spec, first=not units))
                in_ch = out_ch
        self.units = nn.Sequential(*units)
        # After the last addition, pre-activation nets apply their activation once more before pooling
        # (the extra BN-ReLU of resnet-pre-act.lua): the "next unit" that never comes.
        self.head = nn.Sequential(*tokens_to_modules(placement.leading, in_ch))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, spec.num_classes)
        nn.init.zeros_(self.fc.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.units(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_model(spec: ModelSpec | None = None, **fields) -> ResNet:
    """A ResNet from a spec, or from loose fields (`variant="full_preact", depth=110`)."""
    if spec is None:
        if "variant" in fields:
            fields = {**variant_fields(fields.pop("variant")), **fields}
        spec = make_spec(**fields)
    return ResNet(spec)


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
        model(torch.zeros(1, model.spec.in_channels, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
