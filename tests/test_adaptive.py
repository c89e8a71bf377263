"""Adaptive seeds: α spending, and the loop on real Ray with trials whose outcome the test controls."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dashboards.sequential import look_alphas, obrien_fleming_spent, planned_looks
from orchestrator.adaptive import run_until_decided
from orchestrator.grids import load_grid
from orchestrator.scheduler import GridRunner
from orchestrator.state import StateStore
from orchestrator.tracking import Tracker

GRID = {"name": "adaptive", "dataset": "synthetic", "subset": 256, "recipe": "smoke", "depths": [8],
        "block": "basic", "width": 4, "variants": ["original", "full_preact"], "seeds": 3}


def test_spending_adds_up_to_alpha_and_starts_small():
    looks = planned_looks(3, 3, 15)
    assert looks == [3, 6, 9, 12, 15]
    alphas = look_alphas(looks, 0.05)
    assert sum(alphas) == pytest.approx(0.05) and all(a > 0 for a in alphas)
    assert alphas[0] < 1e-4 < alphas[-1]  # O'Brien–Fleming: early looks spend almost nothing
    assert obrien_fleming_spent(1.0, 0.05) == pytest.approx(0.05)
    assert planned_looks(5, 4, 11) == [5, 9, 11]
    with pytest.raises(ValueError):
        planned_looks(1, 1, 5)


def fake_trial(task: dict) -> dict:
    """Test error drawn from the unit's distribution (set by the test through the grid's width)."""
    config = json.loads(task["config"])
    unit, seed = config["model"]["unit"], config["seed"]
    effect = 5.0 if config["model"]["width"] == 4 else 0.0  # width 4: a real difference; 5: none
    mean = 20.0 - (effect if unit == "full_preact" else 0.0)
    rng = np.random.default_rng([seed, len(unit)])
    return {"status": "finished", "test_error": float(mean + rng.normal(0.0, 1.0)), "train_loss": 0.5,
            "train_error": 10.0, "history": [], "resumed_from": None, "iterations": 40}


def runner():
    return GridRunner(store=StateStore(), tracker=Tracker(), trial_fn=fake_trial, progress=False)


def test_clear_difference_stops_early(ablate_home, local_ray):
    out = run_until_decided(runner(), load_grid(GRID), max_seeds=15, batch=3)
    decision = out["adaptive"]["decisions"][0]
    assert decision["decision"] == "better" and decision["look"] < 5
    assert out["trials"] < 2 * 15


def test_null_difference_stays_within_the_cap(ablate_home, local_ray):
    out = run_until_decided(runner(), load_grid({**GRID, "name": "null", "width": 5}), max_seeds=9, batch=3)
    assert out["adaptive"]["decisions"][0]["decision"] in ("undecided", "equivalent")
    assert out["trials"] <= 2 * 9
    seeds = {t["seed"] for t in StateStore().grid_trials(out["grid"])}
    assert seeds == set(range(9)) and len(out["adaptive"]["looks"]) == 3
