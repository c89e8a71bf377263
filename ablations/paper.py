"""The paper's own numbers and its tables as bundled grids (He et al. 2016, test error %).

All CIFAR numbers in the paper are the median of 5 runs; the ImageNet ones are single runs, evaluated on
one 320×320 crop of the validation set, top-1 (`test_error`) and top-5 (`test_error_top5`). "fail" (test
error above 20%) is kept as the string "fail", never as a number, so a table can show it beside a
measured value.
"""
from __future__ import annotations

from typing import Any

# (dataset, depth, variant) → the paper's test error % or "fail".
PAPER_RESULTS: dict[tuple[str, int, str], float | str] = {
    # Table 1: ResNet-110 shortcuts on the original unit.
    ("cifar10", 110, "original"): 6.61,
    ("cifar10", 110, "scale-0"): "fail",
    ("cifar10", 110, "scale-0.5"): "fail",
    ("cifar10", 110, "scale-0.5-0.5"): 12.35,
    ("cifar10", 110, "exclusive_gate-b0"): "fail",
    ("cifar10", 110, "exclusive_gate-b-6"): 8.70,
    ("cifar10", 110, "exclusive_gate-b-7"): 9.81,
    ("cifar10", 110, "shortcut_gate-b0"): 12.86,
    ("cifar10", 110, "shortcut_gate-b-6"): 6.91,
    ("cifar10", 110, "conv1x1"): 12.22,
    ("cifar10", 110, "dropout-0.5"): "fail",
    # Table 2: activation placements.
    ("cifar10", 110, "bn_after_add"): 8.17,
    ("cifar10", 110, "relu_before_add"): 7.84,
    ("cifar10", 110, "relu_only_preact"): 6.71,
    ("cifar10", 110, "full_preact"): 6.37,
    ("cifar10", 164, "original"): 5.93,
    ("cifar10", 164, "bn_after_add"): 6.50,
    ("cifar10", 164, "relu_before_add"): 6.14,
    ("cifar10", 164, "relu_only_preact"): 5.91,
    ("cifar10", 164, "full_preact"): 5.46,
    # Table 3: original vs pre-activation at depth.
    ("cifar10", 1001, "original"): 7.61,
    ("cifar10", 1001, "full_preact"): 4.92,
    ("cifar100", 164, "original"): 25.16,
    ("cifar100", 164, "full_preact"): 24.33,
    ("cifar100", 1001, "original"): 27.82,
    ("cifar100", 1001, "full_preact"): 22.71,
    # Table 3: the 1-layer-skip ResNet-110 (one 3×3 convolution per unit).
    ("cifar10", 110, "original-1layer"): 9.90,
    ("cifar10", 110, "full_preact-1layer"): 8.91,
    # ResNet-1001 at batch 64 (Table 4; the resnet-1k-layers code): the grid `resnet1001-batch64` below.
    ("cifar10", 1001, "full_preact-batch64"): 4.62,
    # Table 5: ImageNet, single 320 crop, top-1.
    ("imagenet", 152, "original"): 21.3,
    ("imagenet", 152, "full_preact"): 21.1,
    ("imagenet", 200, "original"): 21.8,
    ("imagenet", 200, "full_preact"): 20.7,
}
# Table 5: ImageNet, single 320 crop, top-5.
PAPER_TOP5: dict[tuple[str, int, str], float] = {
    ("imagenet", 152, "original"): 5.5,
    ("imagenet", 152, "full_preact"): 5.5,
    ("imagenet", 200, "original"): 6.0,
    ("imagenet", 200, "full_preact"): 5.3,
}
PAPER_METRICS = {"test_error": PAPER_RESULTS, "test_error_top5": PAPER_TOP5}
FAIL_THRESHOLD = 20.0  # the paper's "fail": test error above 20%


def paper_value(dataset: str, depth: int, variant: str, metric: str = "test_error") -> float | str | None:
    """The paper's figure for a cell in `metric` (top-1 or top-5 test error), or None."""
    return PAPER_METRICS.get(metric, {}).get((dataset, depth, variant))


TABLE1_VARIANTS = ["original", "scale-0", "scale-0.5", "scale-0.5-0.5", "exclusive_gate-b0", "exclusive_gate-b-6",
                   "exclusive_gate-b-7", "shortcut_gate-b0", "shortcut_gate-b-6", "conv1x1", "dropout-0.5"]
TABLE2_VARIANTS = ["original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact"]

# Bundled grids: the paper's tables at full scale, and CPU-scale versions on Fashion-MNIST.
GRIDS: dict[str, dict[str, Any]] = {
    "table1": dict(name="table1", dataset="cifar10", recipe="paper-cifar", depths=[110], variants=TABLE1_VARIANTS,
                   seeds=5, baseline="original", resources={"cpu": 4, "gpu": 0.25}),
    "table2": dict(name="table2", dataset="cifar10", recipe="paper-cifar", depths=[110, 164],
                   variants=TABLE2_VARIANTS, seeds=5, baseline="original", resources={"cpu": 4, "gpu": 0.25}),
    "table3-cifar10": dict(name="table3-cifar10", dataset="cifar10", recipe="paper-cifar", depths=[110, 164, 1001],
                           variants=["original", "full_preact"], seeds=5, baseline="original",
                           resources={"cpu": 4, "gpu": 0.5}),
    "table3-cifar100": dict(name="table3-cifar100", dataset="cifar100", recipe="paper-cifar", depths=[164, 1001],
                            variants=["original", "full_preact"], seeds=5, baseline="original",
                            resources={"cpu": 4, "gpu": 0.5}),
    "table3-1layer": dict(name="table3-1layer", dataset="cifar10", recipe="paper-cifar", depths=[110],
                          variants=["original-1layer", "full_preact-1layer"], seeds=5, baseline="original-1layer",
                          resources={"cpu": 4, "gpu": 0.25}),
    # 4.62% came from the Torch re-implementation at batch 64 on fb.resnet.torch's schedule (its README), beside
    # the paper's batch-128 run (the same trial as table3-cifar10's full_preact at 1001).
    "resnet1001-batch64": dict(name="resnet1001-batch64", dataset="cifar10", recipe="paper-cifar", depths=[1001],
                               variants=["full_preact", {"name": "full_preact-batch64", "from": "full_preact",
                                                         "recipe": "resnet1k-batch64"}],
                               seeds=5, baseline="full_preact", resources={"cpu": 4, "gpu": 0.5}),
    # Single runs, as the paper's: one ImageNet training is days on 8 GPUs. Compare top-5 with
    # `ablate compare table5 --metric test_error_top5`.
    "table5": dict(name="table5", dataset="imagenet", recipe="paper-imagenet", depths=[152, 200],
                   variants=["original", "full_preact"], seeds=1, baseline="original",
                   resources={"cpu": 16, "gpu": 1}),
    # CPU-scale stand-ins: their tables show the paper's ResNet-110 CIFAR-10 figures, labelled as such.
    "mini-table1": dict(name="mini-table1", dataset="fashion-mnist", recipe="mini-cpu", depths=[20],
                        paper_setting=["cifar10", 110],
                        variants=["original", "scale-0.5", "scale-0.5-0.5", "exclusive_gate-b-6",
                                  "shortcut_gate-b-6", "conv1x1"], seeds=3, baseline="original",
                        resources={"cpu": 1, "gpu": 0}),
    "mini-table2": dict(name="mini-table2", dataset="fashion-mnist", recipe="mini-cpu", depths=[20],
                        paper_setting=["cifar10", 110],
                        variants=TABLE2_VARIANTS, seeds=3, baseline="original", resources={"cpu": 1, "gpu": 0}),
    # The README's main job: the paper's dropout shortcut (Table 1, Fig. 2f) against the identity, three seeds
    # each, decided within minutes on two cores. Width 8 buys the whole mini-cpu schedule (with its eight
    # intermediate evaluations on 2,000 test images, the live test-error curve) in about two minutes a trial:
    # measured on one core, original-20, seed 0: width 8 × 800 iterations 14.90% test error in 115 s.
    # Why this pair and three seeds: at 8 seeds of this very setting (ablations/examples/mini-tables.yaml),
    # dropout-0.5 was 3.9-6.8 points worse than the identity on every seed, while the Table 2 placements
    # differed from it by under one point with a seed spread of about 1.3: no design of a few seeds decides
    # those. Two seeds cannot decide anything either (a paired t-test with one degree of freedom needs
    # t > 12.7); three can.
    "demo": dict(name="demo", dataset="fashion-mnist", subset=20000, width=8, recipe="mini-cpu",
                 depths=[20], variants=["original", "dropout-0.5"], seeds=3, baseline="original",
                 resources={"cpu": 1, "gpu": 0}, paper_setting=["cifar10", 110]),
    "smoke": dict(name="smoke", dataset="synthetic", subset=512, recipe="smoke", depths=[8], block="basic", width=4,
                  variants=["original", "full_preact"], seeds=2, baseline="original",
                  resources={"cpu": 1, "gpu": 0}),
}
