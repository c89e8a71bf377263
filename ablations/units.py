"""Residual units built from data: an activation placement (Fig. 4) times a shortcut (Fig. 2).

A placement is a token pattern around each convolution of the residual branch F and after the addition;
one ResidualUnit class reads it, for the basic (3×3, 3×3), bottleneck (1×1, 3×3, 1×1) and single (3×3)
blocks alike.
Shortcuts differ in structure only twice: a plain path h(x) = λ·P(x) and a gated one; each is one class.

Every module also takes `groups` (default 1): k independent copies of itself side by side, as channel
groups. Widths stay per copy; the module holds k× the channels, every convolution has `groups=k`, BN
normalises each channel on its own, and the option-A padding pads within each group, so copy g reads
and writes only channels [g·C, (g+1)·C) and k networks train as one (workers/fused.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ModelSpec


@dataclass(frozen=True)
class Placement:
    """Tokens around each convolution of F (`layer`, the last one `last`) and after the addition."""
    layer: tuple[str, ...]
    last: tuple[str, ...]
    after_add: tuple[str, ...] = ()

    @property
    def leading(self) -> tuple[str, ...]:
        """The activation before the first convolution (pre-activation units), possibly empty."""
        return self.layer[: self.layer.index("conv")]


PLACEMENTS = {
    "original": Placement(("conv", "bn", "relu"), ("conv", "bn"), ("relu",)),          # (a)
    "bn_after_add": Placement(("conv", "bn", "relu"), ("conv",), ("bn", "relu")),      # (b)
    "relu_before_add": Placement(("conv", "bn", "relu"), ("conv", "bn", "relu")),      # (c)
    "relu_only_preact": Placement(("relu", "conv", "bn"), ("relu", "conv", "bn")),     # (d)
    "full_preact": Placement(("bn", "relu", "conv"), ("bn", "relu", "conv")),          # (e)
}


def he_init(conv: nn.Conv2d) -> None:
    """N(0, 2/(k·k·out)), no bias: the reference code's ConvInit (bias removed under cuDNN ≥ 4).
    `out` counts one group's output channels: the fan-out of one copy."""
    k = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / k))


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, bias: bool = False, groups: int = 1) -> nn.Conv2d:
    """in_ch → out_ch per copy; with `groups` copies the weight is the copies' weights stacked on dim 0."""
    layer = nn.Conv2d(groups * in_ch, groups * out_ch, kernel, stride, padding=kernel // 2, bias=bias, groups=groups)
    he_init(layer)
    return layer


def tokens_to_modules(tokens: tuple[str, ...], channels: int, groups: int = 1) -> list[nn.Module]:
    """Activation tokens (no convolutions) as modules acting on `channels` channels of each copy."""
    return [nn.BatchNorm2d(groups * channels) if t == "bn" else nn.ReLU(inplace=False) for t in tokens]


class ZeroPadShortcut(nn.Module):
    """Option A: the identity, subsampled by the stride and zero-padded to the new width (no parameters)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int = 1):
        super().__init__()
        self.stride, self.extra, self.groups = stride, out_ch - in_ch, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if not self.extra:
            return x
        if self.groups == 1:
            return F.pad(x, (0, 0, 0, 0, 0, self.extra))
        # Per copy: channels as the last axis split into [copy, channel], zeros appended to each copy's
        # channels; the result is channels_last, the trainer's layout (padding is exact in any layout).
        y = x.permute(0, 2, 3, 1).unflatten(3, (self.groups, -1))
        return F.pad(y, (0, self.extra)).flatten(3).permute(0, 3, 1, 2)


def projection(in_ch: int, out_ch: int, stride: int, spec: ModelSpec, groups: int = 1) -> nn.Module:
    """The path P(x) before any scaling or gating: identity, option A, or a 1×1 convolution.

    The 1×1 projection carries BN in the post-activation units (fb.resnet.torch resnet.lua) and none in
    pre-activation units, where the next unit normalises the sum (resnet-pre-act.lua).
    """
    shape_changes = stride != 1 or in_ch != out_ch
    if spec.shortcut == "conv1x1" or (shape_changes and spec.downsample == "B"):
        layers: list[nn.Module] = [conv(in_ch, out_ch, 1, stride, groups=groups)]
        if not spec.preact:
            layers.append(nn.BatchNorm2d(groups * out_ch))
        return nn.Sequential(*layers)
    if shape_changes:
        if out_ch < in_ch:
            raise ValueError("option A cannot narrow the shortcut")
        return ZeroPadShortcut(in_ch, out_ch, stride, groups)
    return nn.Identity()


class PlainShortcut(nn.Module):
    """y = λ·D(P(x)) + μ·F(x): identity (λ=μ=1), constant scaling, 1×1 conv, dropout (D).

    Two dropouts. `dropout` is the paper's (§3.1, Fig. 2f): a keep-mask with no rescaling in training, so
    it "statistically imposes a scale of λ with an expectation of 0.5 on the shortcut", and evaluation
    multiplies by that expectation, 1 − p. `inverted_dropout` rescales the kept elements by 1/(1 − p) in
    training and is the identity at evaluation: its expectation is 1, a different network.
    """

    def __init__(self, path: nn.Module, scale: float = 1.0, residual_scale: float = 1.0, dropout: float = 0.0,
                 inverted: bool = False):
        super().__init__()
        self.path, self.scale, self.residual_scale = path, scale, residual_scale
        self.dropout, self.inverted = dropout, inverted

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        h = self.path(x)
        if self.dropout and self.inverted:
            h = F.dropout(h, self.dropout, self.training)
        elif self.dropout:
            keep = 1.0 - self.dropout
            # The mask draws from the global generator, which the trainer seeds per (seed, iteration).
            h = h * torch.empty_like(h).bernoulli_(keep) if self.training else h * keep
        if self.scale != 1.0:
            h = h * self.scale
        return h + (f * self.residual_scale if self.residual_scale != 1.0 else f)

    def analytic_gain(self) -> float | None:
        """E[h'(x)] when it is a constant (identity, scaling and dropout without a projection), else None:
        dropout's expectation is 1 − p (the paper's) or 1 (inverted)."""
        if any(p.requires_grad for p in self.path.parameters()):
            return None
        expectation = 1.0 if self.inverted or not self.dropout else 1.0 - self.dropout
        return self.scale * expectation


class GatedShortcut(nn.Module):
    """g(x) = σ(W_g x + b_g), a 1×1 convolution and a sigmoid; y = (1−g)·P(x) + (g·F or F)."""

    def __init__(self, path: nn.Module, in_ch: int, out_ch: int, stride: int, gate_bias: float, exclusive: bool,
                 groups: int = 1):
        super().__init__()
        self.path, self.exclusive, self.gate_bias = path, exclusive, gate_bias
        self.gate = conv(in_ch, out_ch, 1, stride, bias=True, groups=groups)
        self.init_gate()

    def init_gate(self) -> None:
        # Table 1: b_g initialised at 0 … −7; a very negative bias starts the unit near the identity.
        nn.init.constant_(self.gate.bias, self.gate_bias)

    def forward(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        # The gate in full precision whatever autocast does: in bf16, σ(b_g = −7) rounds 1 − g to exactly 1,
        # which is not the network the paper gates.
        with torch.autocast(x.device.type, enabled=False):
            g = torch.sigmoid(self.gate(x.float()))
            return (1.0 - g) * self.path(x).float() + (g * f.float() if self.exclusive else f.float())

    def analytic_gain(self) -> None:
        return None


def make_shortcut(in_ch: int, out_ch: int, stride: int, spec: ModelSpec, groups: int = 1) -> nn.Module:
    path = projection(in_ch, out_ch, stride, spec, groups)
    if spec.shortcut in ("exclusive_gate", "shortcut_gate"):
        return GatedShortcut(path, in_ch, out_ch, stride, spec.gate_bias, spec.shortcut == "exclusive_gate", groups)
    if spec.shortcut == "scale":
        return PlainShortcut(path, spec.shortcut_scale, spec.residual_scale)
    if spec.shortcut in ("dropout", "inverted_dropout"):
        return PlainShortcut(path, dropout=spec.dropout, inverted=spec.shortcut == "inverted_dropout")
    return PlainShortcut(path)


# Block structure: kernel sizes of F and the width of its inner layers relative to the unit's output.
BLOCK_KERNELS = {"basic": (3, 3), "bottleneck": (1, 3, 1), "single": (3,)}
EXPANSION = {"basic": 1, "bottleneck": 4, "single": 1}


class ResidualUnit(nn.Module):
    """x_{l+1} = f(h(x_l) + F(x_l)), with F, h and f read from the placement and the shortcut spec.

    One signature for every unit (in_ch, out_ch, stride, spec, first, groups, activated). `shared` holds the
    leading activation when it is applied before the split, feeding both paths: in the network's first unit
    (the activation right after conv1) and in every unit that changes shape, as in the reference code.
    `activated`: the input is already activated (the ImageNet stem ends in BN-ReLU and max-pool), so the
    unit has no leading activation at all (fb.resnet.torch preresnet.lua, the first unit's 'no_preact').
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, spec: ModelSpec, first: bool = False, groups: int = 1,
                 activated: bool = False):
        super().__init__()
        placement = PLACEMENTS[spec.unit]
        kernels = BLOCK_KERNELS[spec.block]
        mid = out_ch // EXPANSION[spec.block]
        share = bool(placement.leading) and not activated and (first or stride != 1 or in_ch != out_ch)
        self.shared = nn.Sequential(*tokens_to_modules(placement.leading, in_ch, groups)) if share else nn.Identity()
        widths = [mid] * (len(kernels) - 1) + [out_ch]
        layers: list[nn.Module] = []
        channels = in_ch
        for i, (kernel, width) in enumerate(zip(kernels, widths)):
            tokens = placement.last if i == len(kernels) - 1 else placement.layer
            if i == 0 and (share or activated):
                tokens = tokens[len(placement.leading):]
            # The stride sits on F's first convolution (resnet-pre-act.lua; the basic block has no choice).
            at = tokens.index("conv")
            layers += tokens_to_modules(tokens[:at], channels, groups)
            layers.append(conv(channels, width, kernel, stride if i == 0 else 1, groups=groups))
            channels = width
            layers += tokens_to_modules(tokens[at + 1:], channels, groups)
        self.branch = nn.Sequential(*layers)
        self.shortcut = make_shortcut(in_ch, out_ch, stride, spec, groups)
        self.after_add = nn.Sequential(*tokens_to_modules(placement.after_add, out_ch, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(x)
        return self.after_add(self.shortcut(x, self.branch(x)))
