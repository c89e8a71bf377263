"""The residual-unit zoo: every placement × shortcut × block builds and trains, and matches the papers."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ablations import (SHORTCUTS, UNITS, VARIANTS, SpecError, build_model, count_macs, count_params, make_spec,
                       probe_propagation)
from ablations.spec import IMAGENET_STAGES, dataset_model_fields
from ablations.units import GatedShortcut, PlainShortcut, ResidualUnit

# n = 1: the smallest network of each block, narrow so the whole catalogue runs in seconds (single: n = 2, as
# depth 8 is the least a spec takes). On the ImageNet plan: the smallest depth of each block.
SMALLEST = {"basic": 8, "bottleneck": 11, "single": 8}
IMAGENET_SMALLEST = {"basic": 18, "bottleneck": 50}
IMAGENET = dataset_model_fields("imagenet")
SHORTCUT_EXTRAS = {"scale": dict(shortcut_scale=0.5, residual_scale=0.5), "exclusive_gate": dict(gate_bias=-2.0),
                   "shortcut_gate": dict(gate_bias=-2.0), "dropout": dict(dropout=0.5),
                   "inverted_dropout": dict(dropout=0.5)}


@pytest.mark.parametrize("plan,block,downsample", [
    ("cifar", "basic", "A"), ("cifar", "basic", "B"), ("cifar", "bottleneck", "A"), ("cifar", "bottleneck", "B"),
    ("cifar", "single", "A"), ("imagenet", "basic", "A"), ("imagenet", "bottleneck", "B")])
@pytest.mark.parametrize("unit,shortcut", list(itertools.product(UNITS, SHORTCUTS)))
def test_every_combination_builds_and_trains_one_step(unit, shortcut, plan, block, downsample):
    torch.manual_seed(0)
    # The ImageNet plan on 32×32 images: its five halvings leave 1×1 before pooling.
    shape = {"depth": IMAGENET_SMALLEST[block], **IMAGENET, "num_classes": 10} if plan == "imagenet" else \
        {"depth": SMALLEST[block]}
    model = build_model(**shape, block=block, downsample=downsample, width=4, unit=unit, shortcut=shortcut,
                        **SHORTCUT_EXTRAS.get(shortcut, {}))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = copy.deepcopy(model.state_dict())
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    opt.step()
    changed = [k for k, v in model.state_dict().items() if k in dict(model.named_parameters())
               and not torch.equal(v, before[k])]
    assert len(changed) == len(list(model.parameters()))
    assert model.eval()(x).shape == (4, 10)


@pytest.mark.parametrize("dataset_shape", [(1, 28, 10), (3, 32, 100)])
@pytest.mark.parametrize("unit", ["original", "full_preact"])
def test_stem_follows_channels_and_head_follows_classes(dataset_shape, unit):
    channels, size, classes = dataset_shape
    model = build_model(depth=8, block="basic", width=4, unit=unit, in_channels=channels, num_classes=classes)
    assert model.stem[0].in_channels == channels
    assert model(torch.randn(2, channels, size, size)).shape == (2, classes)


# --- exact parameter counts, derived from the reference code's structure ------------------------------
def basic_option_a_params(n: int, w: int = 16, c: int = 3, classes: int = 10) -> int:
    """Original CIFAR ResNet (He et al. 2015; fb.resnet.torch resnet.lua, shortcutType A): conv3×3 c→w with
    BN; per unit two bias-free 3×3 convs, each followed by BN (2 params a channel); option A adds no
    parameters; the linear layer has a bias."""
    total = 9 * c * w + 2 * w
    for stage in range(3):
        out = w * 2 ** stage
        inp = out if stage == 0 else out // 2
        first = 9 * inp * out + 9 * out * out + 4 * out
        rest = 18 * out * out + 4 * out
        total += first + (n - 1) * rest
    return total + 4 * w * classes + classes


def preact_bottleneck_params(n: int, c: int = 3, classes: int = 10) -> int:
    """resnet-pre-act.lua: conv3×3 3→16 without BN; stages of n units with outputs 64/128/256 (inner 16/32/64).
    A same-shape unit: BN(in), 1×1 in→b, BN(b), 3×3 b→b, BN(b), 1×1 b→4b. A shape-changing unit: one
    shared BN(in), the same convolutions, and a bias-free 1×1 in→4b projection. Then BN(256) and a
    linear layer with bias. Convolutions have no bias (removed under cuDNN ≥ 4)."""
    total = 9 * c * 16
    inp = 16
    for b in (16, 32, 64):
        out = 4 * b
        convs = inp * b + 9 * b * b + b * out
        first = 2 * inp + convs + 4 * b + inp * out
        same = 2 * out + (out * b + 9 * b * b + b * out) + 4 * b
        total += first + (n - 1) * same
        inp = out
    return total + 2 * 256 + 256 * classes + classes


@pytest.mark.parametrize("depth,expected", [(20, 269_722), (56, 853_018), (110, 1_727_962)])
def test_original_resnet_option_a_params(depth, expected):
    n = (depth - 2) // 6
    assert basic_option_a_params(n) == expected
    assert count_params(build_model(depth=depth, unit="original", downsample="A")) == expected


@pytest.mark.parametrize("depth,expected", [(164, 1_703_258), (1001, 10_327_706)])
def test_preact_bottleneck_params(depth, expected):
    n = (depth - 2) // 9
    assert preact_bottleneck_params(n) == expected
    assert count_params(build_model(depth=depth, unit="full_preact")) == expected


def test_fashion_mnist_stem_and_cifar100_head_counts():
    model = build_model(depth=20, in_channels=1, num_classes=100)
    assert count_params(model) == basic_option_a_params(3, c=1, classes=100)


def test_macs_of_resnet20():
    # stem 32·32·16·27; stage 1: 3 units × 2 convs × 32·32·16·16·9; stages 2 and 3 halve the area and
    # double the width, their first conv taking the narrower input; the classifier 64·10.
    stage1 = 3 * 2 * 32 * 32 * 16 * 16 * 9
    later = (16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9) + (8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9)
    assert count_macs(build_model(depth=20), 32) == 32 * 32 * 16 * 27 + stage1 + later + 640


# --- structure the paper specifies ----------------------------------------------------------------------
def test_eqn4_forward_is_a_sum_of_residuals_for_full_preact_identity():
    """x_L = x_l + Σ F(x_i) (Eqn. 4) across the same-shape units of stage 1."""
    torch.manual_seed(0)
    model = build_model(depth=20, unit="full_preact").train()
    units = list(model.units)[:3]
    inputs, residuals = [], []
    hooks = [u.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for u in units]
    hooks += [u.branch.register_forward_hook(lambda m, a, out: residuals.append(out)) for u in units]
    outputs = []
    hooks.append(units[2].register_forward_hook(lambda m, a, out: outputs.append(out)))
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))
    x_l, x_L = inputs[1], outputs[0]
    torch.testing.assert_close(x_L, x_l + residuals[1] + residuals[2], rtol=0, atol=1e-5)


def test_preact_first_unit_and_head_activation():
    model = build_model(depth=20, unit="full_preact")
    first = model.units[0]
    assert [type(m).__name__ for m in first.shared] == ["BatchNorm2d", "ReLU"]  # activation after conv1
    assert len(model.stem) == 1  # bare conv1: no BN-ReLU of its own
    assert not isinstance(model.units[1].shared, torch.nn.Sequential)
    assert [type(m).__name__ for m in model.head] == ["BatchNorm2d", "ReLU"]  # the extra BN-ReLU
    # A shape-changing unit shares its BN-ReLU between both paths (the reference code's layout).
    assert [type(m).__name__ for m in model.units[3].shared] == ["BatchNorm2d", "ReLU"]
    assert len(build_model(depth=20).head) == 0


def test_original_unit_tokens():
    unit = build_model(depth=8, block="basic", width=4).units[0]
    assert [type(m).__name__ for m in unit.branch] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    assert [type(m).__name__ for m in unit.after_add] == ["ReLU"]


def test_bottleneck_stride_on_first_1x1():
    unit = build_model(depth=11, block="bottleneck", width=4, unit="full_preact").units[1]
    convs = [m for m in unit.branch if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size[0] for c in convs] == [1, 3, 1] and convs[0].stride == (2, 2)


def test_paper_dropout_is_a_keep_mask_with_expectation_half():
    """§3.1: dropout on the shortcut "statistically imposes a scale of λ with an expectation of 0.5": kept
    elements pass unscaled in training, and evaluation applies the expectation."""
    shortcut = PlainShortcut(torch.nn.Identity(), dropout=0.5)
    x, f = torch.rand(64, 8, 6, 6) + 0.5, torch.zeros(64, 8, 6, 6)
    torch.manual_seed(0)
    out = shortcut.train()(x, f)
    assert torch.all((out == 0) | (out == x))  # a mask, no 1/(1-p) rescaling
    assert float((out != 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    torch.testing.assert_close(shortcut.eval()(x, f), 0.5 * x)
    assert shortcut.analytic_gain() == 0.5


def test_inverted_dropout_is_the_identity_at_evaluation():
    shortcut = PlainShortcut(torch.nn.Identity(), dropout=0.5, inverted=True)
    x, f = torch.rand(64, 8, 6, 6) + 0.5, torch.zeros(64, 8, 6, 6)
    torch.manual_seed(0)
    out = shortcut.train()(x, f)
    assert torch.all((out == 0) | torch.isclose(out, 2 * x))
    torch.testing.assert_close(shortcut.eval()(x, f), x)
    assert shortcut.analytic_gain() == 1.0


@pytest.mark.parametrize("shortcut,twin", [("dropout", dict(shortcut="scale", shortcut_scale=0.5)),
                                           ("inverted_dropout", {})])
def test_dropout_networks_at_evaluation(shortcut, twin):
    """In evaluation the paper's dropout network is the λ = 0.5 network, the inverted one the plain one."""
    torch.manual_seed(0)
    dropped = build_model(depth=8, block="basic", width=4, shortcut=shortcut, dropout=0.5)
    reference = build_model(depth=8, block="basic", width=4, **twin)
    reference.load_state_dict(dropped.state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(dropped.eval()(x), reference.eval()(x))
    dropped.train()
    torch.manual_seed(1)
    a = dropped(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, dropped(x))


@pytest.mark.parametrize("exclusive", [True, False])
def test_gates_stay_in_full_precision_under_bf16_autocast(exclusive):
    """b_g = −7: 1 − σ(−7) = 0.999088..., which bf16 (8 bits of mantissa) rounds to exactly 1."""
    gate = GatedShortcut(torch.nn.Identity(), 4, 4, 1, gate_bias=-7.0, exclusive=exclusive)
    torch.nn.init.zeros_(gate.gate.weight)
    x, f = torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = gate(x, f)
    expected = 1.0 - torch.sigmoid(torch.tensor(-7.0))
    assert out.dtype == torch.float32 and float(out[0, 0, 0, 0]) != 1.0
    assert float(out[0, 0, 0, 0]) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("bias", [0.0, -6.0, -7.0])
def test_gate_bias_initialisation(bias):
    model = build_model(depth=8, block="basic", width=4, shortcut="exclusive_gate", gate_bias=bias)
    gates = [u.shortcut for u in model.units]
    assert all(isinstance(g, GatedShortcut) for g in gates)
    for g in gates:
        assert torch.all(g.gate.bias == bias)
    result = probe_propagation(model, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    if bias <= -6:
        assert all(u["gate_mean"] > 0.97 for u in result["units"])  # 1 − g ≈ 1: the shortcut passes


def test_scale_shortcut_multiplies_both_paths():
    torch.manual_seed(0)
    scaled = build_model(depth=8, block="basic", width=4, shortcut="scale", shortcut_scale=0.5, residual_scale=0.25).units[0]
    x = torch.randn(2, 4, 32, 32)
    f = scaled.branch(x)
    torch.testing.assert_close(scaled.shortcut(x, f), 0.5 * x + 0.25 * f)


# --- the probe ------------------------------------------------------------------------------------------
def test_probe_matches_autograd_and_leaves_model_untouched():
    torch.manual_seed(0)
    model = build_model(depth=20, width=8).eval()
    state = copy.deepcopy(model.state_dict())
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    result = probe_propagation(model, x, y)
    assert not model.training and all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Independent computation of ‖∂E/∂x_1‖ and ‖∂E/∂x_L‖ on a copy in training mode.
    twin = copy.deepcopy(model).train()
    x1 = twin.stem(x)
    x1.retain_grad()
    xL = twin.units(x1)
    xL.retain_grad()
    F.cross_entropy(twin.fc(torch.flatten(twin.pool(twin.head(xL)), 1)), y).backward()
    assert result["units"][0]["grad_norm"] == pytest.approx(float(x1.grad.norm()), rel=1e-5)
    assert result["grad_ratio_first_last"] == pytest.approx(float(x1.grad.norm() / xL.grad.norm()), rel=1e-5)
    assert [u["stage"] for u in result["units"]] == [1] * 3 + [2] * 3 + [3] * 3


@pytest.mark.parametrize("variant,factor", [("original", 1.0), ("scale-0.5", 0.5 ** 9), ("scale-0", 0.0),
                                            ("conv1x1", None), ("exclusive_gate-b-6", None),
                                            ("dropout-0.5", 0.5 ** 9), ("inverted_dropout-0.5", 1.0)])
def test_probe_analytic_shortcut_factor(variant, factor):
    model = build_model(variant=variant, depth=20, width=4)
    result = probe_propagation(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert result["shortcut_factor"] == (None if factor is None else pytest.approx(factor))
    assert math.isfinite(result["loss"])


# --- specs and their errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,needle", [
    (dict(depth=20, unit="preact"), "choose one of: original, bn_after_add"),
    (dict(depth=20, shortcut="gate"), "exclusive_gate"),
    (dict(depth=21, block="basic"), "6n+2"),
    (dict(depth=22, block="bottleneck"), "9n+2"),
    (dict(depth=26), "say block"),
    (dict(depth=20, shortcut="dropout", dropout=1.0), "less than 1"),
    (dict(depth=20, shortcut="scale", shortcut_scale=-1), "greater than or equal to 0"),
    (dict(depth=20, gate_bias=-6), "gate_bias applies only to shortcut exclusive_gate or shortcut_gate"),
    (dict(depth=20, colour="red"), "colour"),
])
def test_bad_specs_name_the_problem(fields, needle):
    with pytest.raises(SpecError, match=None) as info:
        make_spec(**fields)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_defaults_follow_the_papers():
    assert make_spec(depth=110).block == "basic" and make_spec(depth=110).downsample == "A"
    assert make_spec(depth=164).block == "bottleneck" and make_spec(depth=164).downsample == "B"
    assert make_spec(depth=29, block="bottleneck").stages == (3, 3, 3)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_catalogue_variants_build(name):
    model = build_model(variant=name, depth=8, block="basic", width=4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert all(isinstance(u, ResidualUnit) for u in model.units)


# --- the ImageNet plan and the 1-layer unit ---------------------------------------------------------------
@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_original_imagenet_params_equal_torchvision(depth):
    import torchvision
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    assert count_params(build_model(depth=depth, **IMAGENET)) == count_params(reference)


def preact_imagenet_params(stages: tuple[int, ...], classes: int = 1000) -> int:
    """fb.resnet.torch preresnet.lua on ImageNet: conv7×7 3→64 and BN(64) before the max-pool; stage s of
    bottlenecks with inner width b = 64·2^s and output 4b. The first unit of stage 1 ('no_preact') starts at
    its 1×1 convolution; every other unit starts with BN(in) (shared with the projection in the first units
    of stages 2-4), then 1×1 in→b, BN(b), 3×3 b→b, BN(b), 1×1 b→4b. A first unit adds a bias-free 1×1
    in→4b projection without BN. Then BN(2048) and a linear layer with bias; convolutions have no bias."""
    total = 49 * 3 * 64 + 2 * 64
    inp = 64
    for s, count in enumerate(stages):
        b = 64 * 2 ** s
        out = 4 * b
        first = (2 * inp if s else 0) + inp * b + 9 * b * b + b * out + 4 * b + inp * out
        same = 2 * out + out * b + 9 * b * b + b * out + 4 * b
        total += first + (count - 1) * same
        inp = out
    return total + 2 * 2048 + 2048 * classes + classes


@pytest.mark.parametrize("depth,expected", [(50, 25_549_352), (101, 44_541_480), (152, 60_185_128),
                                            (200, 64_666_152)])
def test_preact_imagenet_params(depth, expected):
    assert preact_imagenet_params(IMAGENET_STAGES[depth][1]) == expected
    assert count_params(build_model(depth=depth, unit="full_preact", **IMAGENET)) == expected


def test_imagenet_macs_match_the_original_models():
    """He et al. 2015, Table 1: ResNet-50 takes 3.8 × 10^9 multiply-adds at 224×224 with the stride on F's
    first 1×1 (on the 3×3, as torchvision, it would be 4.1)."""
    assert abs(count_macs(build_model(depth=50, **IMAGENET), 224) / 1e9 - 3.8) < 0.1


@pytest.mark.parametrize("unit", ["original", "full_preact"])
def test_imagenet_stem_first_unit_and_head(unit):
    model = build_model(depth=50, unit=unit, width=4, **IMAGENET)
    assert [type(m).__name__ for m in model.stem] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    conv, pool = model.stem[0], model.stem[3]
    assert (conv.kernel_size, conv.stride, pool.kernel_size, pool.stride) == ((7, 7), (2, 2), 3, 2)
    assert len(model.units) == 16 and model.fc.out_features == 1000
    first, second, stage2 = model.units[0], model.units[1], model.units[3]
    # The stem's BN-ReLU activates the first unit's input: nothing shared, F starts at its convolution.
    assert isinstance(first.shared, torch.nn.Identity) and isinstance(first.branch[0], torch.nn.Conv2d)
    if unit == "full_preact":
        assert type(second.branch[0]).__name__ == "BatchNorm2d"
        assert [type(m).__name__ for m in stage2.shared] == ["BatchNorm2d", "ReLU"]
        assert [type(m).__name__ for m in model.head] == ["BatchNorm2d", "ReLU"]
    else:
        assert len(model.head) == 0 and [type(m).__name__ for m in first.after_add] == ["ReLU"]
    widths = [u.branch[-1].out_channels if unit == "full_preact" else u.branch[-2].out_channels
              for u in (model.units[0], model.units[3], model.units[7], model.units[13])]
    assert widths == [16, 32, 64, 128]  # 4w·2^s at w = 4
    result = probe_propagation(model, torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,)))
    assert [u["stage"] for u in result["units"]] == [1] * 3 + [2] * 4 + [3] * 6 + [4] * 3


def test_imagenet_plan_fused_copies_compute_each_copy():
    """groups=k on the new stem: the grouped 7×7 convolution and the per-channel max-pool keep copies apart."""
    from ablations.resnet import join_states
    fields = dict(depth=50, width=4, unit="full_preact", **IMAGENET)
    solo = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        solo.append(build_model(**fields).eval())
    fused = build_model(**fields, groups=2).eval()
    fused.load_state_dict(join_states([m.state_dict() for m in solo]))
    x, y = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = fused(torch.cat([x, y], 1))
        torch.testing.assert_close(out[:, :1000], solo[0](x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[:, 1000:], solo[1](y), rtol=1e-4, atol=1e-5)


def test_single_block_is_one_convolution_per_unit():
    """Table 3's 1-layer-skip ResNet-110: 3·36 units of one 3×3 convolution; as many 3×3 layers and BNs at the
    same widths as the 2-layer ResNet-110, hence the same parameters."""
    spec = make_spec(depth=110, block="single", unit="full_preact")
    assert spec.stages == (36, 36, 36) and spec.downsample == "A"
    model = build_model(spec)
    assert [type(m).__name__ for m in model.units[1].branch] == ["BatchNorm2d", "ReLU", "Conv2d"]
    assert count_params(build_model(depth=110, block="single")) == count_params(build_model(depth=110))
    assert make_spec(**VARIANTS["original-1layer"], depth=110).block == "single"


@pytest.mark.parametrize("fields,needle", [
    (dict(depth=56, **IMAGENET), "no ImageNet plan; choose one of: 18 (basic)"),
    (dict(depth=50, block="basic", **IMAGENET), "uses block 'bottleneck', not 'basic'"),
    (dict(depth=9, block="single"), "3n+2"),
    (dict(depth=20, plan="mnist"), "plan"),
])
def test_bad_plan_specs_name_the_problem(fields, needle):
    with pytest.raises(SpecError) as info:
        make_spec(**fields)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_dataset_picks_the_plan_and_its_defaults():
    spec = make_spec(depth=50, **IMAGENET)
    assert (spec.plan, spec.block, spec.width, spec.downsample, spec.num_classes) == \
        ("imagenet", "bottleneck", 64, "B", 1000)
    assert make_spec(depth=18, **IMAGENET).downsample == "B"
    assert dataset_model_fields("cifar10")["plan"] == "cifar"
    # The CIFAR plan is left out of the dump (trial keys made before plans existed stay), the other kept.
    assert "plan" not in make_spec(depth=20).model_dump() and spec.model_dump()["plan"] == "imagenet"
    assert make_spec(**make_spec(depth=20).model_dump()) == make_spec(depth=20)
