"""`ablate models` and `ablate probe` through the real command line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ablate


def test_catalogue_json_lists_every_variant():
    r = ablate("models", "--json")
    assert r.code == 0, r.err
    names = {v["name"] for v in r.json["variants"]}
    assert {"original", "full_preact", "scale-0.5", "exclusive_gate-b-6", "dropout-0.5"} <= names
    assert r.json["paper_depths"]["164"] == "bottleneck"


@pytest.mark.parametrize("args,params", [
    (["--depth", "110"], 1_727_962),
    (["--depth", "164", "--unit", "full_preact"], 1_703_258),
    (["--depth", "20", "--dataset", "fashion-mnist"], 269_722 - 2 * 9 * 16),
    (["--dataset", "imagenet", "--depth", "50", "--unit", "original"], 25_557_032),  # torchvision's ResNet-50
])
def test_models_json_counts(args, params):
    r = ablate("models", *args, "--json")
    assert r.code == 0, r.err
    assert r.json["params"] == params and r.json["macs"] > 0


def test_models_variant_option_and_override():
    r = ablate("models", "--variant", "scale-0.5", "--depth", "20", "--shortcut-scale", "0.25", "--json")
    assert r.json["shortcut"] == "scale" and r.json["shortcut_scale"] == 0.25


@pytest.mark.parametrize("args,needle", [
    (["--depth", "20", "--unit", "nope"], "choose one of: original, bn_after_add, relu_before_add"),
    (["--depth", "21", "--block", "basic"], "6n+2"),
    (["--depth", "20", "--shortcut", "dropout", "--dropout", "1.5"], "dropout"),
    (["--depth", "20", "--shortcut", "scale", "--shortcut-scale", "9"], "shortcut_scale"),
    (["--unit", "full_preact"], "--depth"),
    (["--dataset", "imagenet", "--depth", "110"], "depth 110 has no ImageNet plan; choose one of: 18 (basic)"),
])
def test_bad_model_options_exit_2_with_one_line(args, needle):
    r = ablate("models", *args, "--json")
    assert r.code == 2
    assert needle in r.json["error"]
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err


def test_argparse_errors_exit_2():
    r = ablate("models", "--depth", "twenty")
    assert r.code == 2 and "Traceback" not in r.err


def test_probe_json_contract():
    r = ablate("probe", "--depth", "20", "--unit", "full_preact", "--batch", "8", "--json")
    assert r.code == 0, r.err
    out = r.json
    assert len(out["units"]) == 9 and out["grad_ratio_first_last"] > 0
    assert {"x_norm", "grad_norm"} <= set(out["units"][0]) and out["shortcut_factor"] == 1.0
    again = ablate("probe", "--depth", "20", "--unit", "full_preact", "--batch", "8", "--json").json
    assert again["grad_ratio_first_last"] == out["grad_ratio_first_last"]  # seeded


def test_probe_scale_reports_lambda_power():
    out = ablate("probe", "--depth", "20", "--variant", "scale-0.5", "--batch", "4", "--json").json
    assert out["shortcut_factor"] == pytest.approx(0.5 ** 9)


def test_help_does_not_import_torch():
    code = "import sys, orchestrator.cli as c; c.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
