"""Sequential decisions: spending, boundaries against the multivariate normal, each rule, the family-wise error
in a small simulation, `ablate plan` against statsmodels, and the stored plan on real Ray (a rerun goes on
from the stored looks and never tests a look twice)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import TTestPower

from dashboards.sequential import (BETTER, EQUIVALENT, FUTILE, OPEN, SPENDING_GAMMA, WORSE, Plan, crossing_power,
                                   decide, levels, look, planned_looks, replay, sample, spent, z_boundaries)
from orchestrator.adaptive import run_until_decided
from orchestrator.grids import load_grid
from orchestrator.scheduler import GridRunner
from orchestrator.state import StateStore
from orchestrator.tracking import Tracker
from tests.helpers import ROOT, ablate, wait_for

GRID = {"name": "adaptive", "dataset": "synthetic", "subset": 256, "recipe": "smoke", "depths": [8],
        "block": "basic", "width": 4, "variants": ["original", "full_preact"], "seeds": 3}


# --- spending and boundaries -------------------------------------------------------------------------

def test_spending_adds_up_to_alpha_and_lets_early_looks_decide():
    t = np.array([0.25, 0.5, 0.75, 1.0])
    for gamma in (-4.0, -1.0, 0.0, 1.0):
        s = spent(t, 0.05, gamma)
        assert s[-1] == pytest.approx(0.05) and np.all(np.diff(s) > 0)
    assert spent(t, 0.05, 0.0) == pytest.approx(0.05 * t)   # γ = 0: linear
    # O'Brien–Fleming-like γ = −4 spends almost nothing at 3 seeds of 12; the default spends enough to stop
    assert spent(0.25, 0.05, -4.0) < 0.003 < spent(0.25, 0.05, SPENDING_GAMMA)
    assert planned_looks(3, 3, 12) == [3, 6, 9, 12] and planned_looks(5, 4, 11) == [5, 9, 11]
    with pytest.raises(ValueError):
        planned_looks(1, 1, 5)


@pytest.mark.parametrize("two_sided", [True, False])
def test_boundaries_spend_exactly_under_the_multivariate_normal(two_sided):
    fractions = (0.2, 0.45, 0.7, 1.0)   # unequal: a crashed run changes the information, not the error
    spending = tuple(spent(np.array(fractions), 0.05, -1.0))
    c = np.array(z_boundaries(fractions, spending, two_sided))
    t = np.array(fractions)
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))   # corr(Z_i, Z_j) = √(t_i / t_j)
    for k in range(1, 5):   # P(no crossing by look k) = 1 − α(t_k)
        mvn = stats.multivariate_normal(mean=np.zeros(k), cov=cov[:k, :k], seed=0)
        stay = mvn.cdf(c[:k], lower_limit=-c[:k] if two_sided else np.full(k, -np.inf))
        assert 1 - stay == pytest.approx(spending[k - 1], abs=2e-5)
    assert c[0] == pytest.approx(stats.norm.isf(spending[0] / (2 if two_sided else 1)))


def test_power_under_a_drift_against_the_multivariate_normal():
    fractions = (0.25, 0.5, 0.75, 1.0)
    bounds = z_boundaries(fractions, tuple(spent(np.array(fractions), 0.05, -1.0)), True)
    t, c, drift = np.array(fractions), np.array(bounds), 2.8
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
    stay = stats.multivariate_normal(mean=drift * np.sqrt(t), cov=cov, seed=0).cdf(c, lower_limit=-c)
    assert crossing_power(fractions, bounds, drift) == pytest.approx(1 - stay, abs=1e-4)
    assert crossing_power(fractions, bounds, 0.0) == pytest.approx(0.05, abs=1e-6)


# --- each rule ---------------------------------------------------------------------------------------

def one_look(n, mean, sd, improve, plan, rejected=None):
    """`decide` at a one-look plan (thresholds α/j: Holm exactly) for comparisons given as lists."""
    m = len(mean)
    efficacy, equivalence, futility = levels(plan, (n,), m)
    return decide(np.full(m, n), np.array(mean, float), np.array(sd, float), np.array(improve, float),
                  np.ones(m, bool), np.zeros(m, bool) if rejected is None else np.array(rejected),
                  np.tile(efficacy, (m, 1)), np.tile(equivalence, (m, 1)), np.full(m, futility), plan.margin)


def test_a_single_look_is_holm_and_a_rejection_passes_its_alpha_on():
    plan = Plan(looks=(10,), margin=0.01)
    efficacy, equivalence, _ = levels(plan, (10,), 3)
    assert efficacy == pytest.approx([0.05, 0.025, 0.05 / 3], rel=1e-6)   # all α at the only look
    assert equivalence == pytest.approx([0.05, 0.025, 0.05 / 3], rel=1e-6)
    se = 1 / math.sqrt(10)
    # B alone has p between α/2 and α: rejected only once A's rejection passes its share on
    p_b = 0.04
    mean_b = -stats.t.isf(p_b / 2, 9) * se
    outcome, share = one_look(10, [-3.0, mean_b], [1.0, 1.0], [1.0, 1.0], plan)
    assert list(outcome) == [BETTER, BETTER] and list(share) == [2, 1]
    alone, _ = one_look(10, [0.0, mean_b], [1.0, 1.0], [0.5, 1.0], plan)
    assert list(alone) == [OPEN, OPEN]
    # the 75% rule and the direction: significant but beaten on too few seeds, or worse
    ruled, _ = one_look(10, [-3.0, 3.0, 3.0], [1.0, 1.0, 1.0], [0.7, 0.0, 0.3], plan)
    assert list(ruled) == [OPEN, WORSE, OPEN]


def test_equivalence_and_futility_against_the_margin():
    plan = Plan(looks=(10,), margin=0.5, beta=0.2)
    se = 0.2 / math.sqrt(10)
    outcome, share = one_look(10, [0.02, 0.42, 0.0, 1.0], [0.2, 0.2, 3.0, 0.2], [0.5, 0.3, 0.5, 0.0], plan)
    assert outcome[3] == WORSE and share[0] == 3   # the worse one passed its α on: 3 hold α/3
    # TOST: equivalent when the 1 − 2·(α/3) CI fits inside ±0.5; futile when only the 1 − 2β one does
    tost, futile = stats.t.isf(0.05 / 3, 9) * se, stats.t.isf(0.2, 9) * se
    assert 0.02 + tost < 0.5 and 0.42 + futile < 0.5 < 0.42 + tost
    assert list(outcome) == [EQUIVALENT, FUTILE, OPEN, WORSE]   # the third is too noisy to say


def test_look_records_and_replay_never_test_a_stopped_comparison_again():
    plan = Plan(looks=(3, 6, 9), margin=0.2, baseline="b", seeds=tuple(range(9)))
    keys = [("d", 8, "a"), ("d", 8, "c")]
    state = replay(keys, [])
    first = look(plan, 1, state, {keys[0]: (3, -40.0, 0.5, 1.0), keys[1]: (3, 0.1, 2.0, 0.3)})
    assert first[keys[0]]["decision"] == "better" and first[keys[0]]["stopped"] == "efficacy"
    assert first[keys[1]]["stopped"] is None and first[keys[1]]["share"] == 1.0   # a's α passed on
    a = first[keys[0]]
    assert a["alpha_spent"] == pytest.approx(spent(3 / 9, 0.05 / 2, plan.gamma))
    assert a["ci_low"] < a["delta"] < a["ci_high"] < 0   # the repeated CI agrees with the decision
    state = replay(keys, [first])
    assert not state[keys[0]]["open"] and state[keys[0]]["rejected"] and state[keys[1]]["history"] == (3,)
    second = look(plan, 2, state, {keys[0]: (6, 0.0, 1.0, 0.5), keys[1]: (6, 0.1, 2.0, 0.5)})
    assert list(second) == [keys[1]]   # the stopped comparison is not looked at again
    third = look(plan, 3, replay(keys, [first, second]), {keys[1]: (6, 0.1, 2.0, 0.5)})
    # no new pairs at the last look (its runs crashed): nothing tested, nothing spent, stopped at the cap
    assert third[keys[1]]["p_value"] is None and third[keys[1]]["alpha_spent"] is None
    assert third[keys[1]]["stopped"] == "max_seeds" and third[keys[1]]["decision"] == "undecided"
    assert sample({keys[1]: [1.0, -1.0, 3.0]})[keys[1]] == (3, 1.0, 2.0, pytest.approx(1 / 3))


def test_family_wise_error_under_the_null_stays_below_alpha():
    """A small version of bench/decisions.py: 4000 tables of 4 comparisons, looks at 3/6/9/12 seeds."""
    # Loaded from its file: bench/ on sys.path would shadow packages for every later test (bench/workers.py
    # hid the `workers` package from the processes test_distributed spawns).
    spec = importlib.util.spec_from_file_location("bench_decisions", ROOT / "bench" / "decisions.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(5)
    plan = Plan(looks=(3, 6, 9, 12), margin=1.0)
    sims = 4000
    for effects in (np.zeros(4), np.array([0.0, 0.0, -2.0, 2.0])):
        at = bench.running(bench.differences(effects, 12, 0.5, sims, rng))
        outcome, used = bench.ablate(at, (sims, 4), plan)
        fwer = bench.score(outcome, effects, plan.margin)["fwer"]
        assert fwer <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / sims), fwer
        assert used.mean() < 12   # futility and efficacy stop before the cap


# --- the plan on real Ray --------------------------------------------------------------------------------

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
    assert decision["decision"] == "better" and decision["look"] < 5 and decision["stopped"] == "efficacy"
    assert out["trials"] < 2 * 15


def test_null_difference_stops_for_futility_or_at_the_cap(ablate_home, local_ray):
    out = run_until_decided(runner(), load_grid({**GRID, "name": "null", "width": 5}), max_seeds=9, batch=3,
                            margin=3.0)
    decision = out["adaptive"]["decisions"][0]
    assert decision["decision"] in ("undecided", "equivalent") and decision["stopped"] in ("futility", "equivalence",
                                                                                          "max_seeds")
    assert out["trials"] <= 2 * 9
    seeds = {t["seed"] for t in StateStore().grid_trials(out["grid"])}
    assert seeds == set(range(3 * decision["look"]))


def looks_table(home) -> list[dict]:
    try:
        with sqlite3.connect(home / "state.db") as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM ablate_sequential_looks ORDER BY look, variant")]
    except sqlite3.OperationalError:   # the driver has not created its tables yet
        return []


def test_a_stored_plan_goes_on_after_an_interruption_and_never_tests_a_look_twice(ablate_home, tmp_path):
    """Real training (synthetic data, smoke recipe): `ablate run --until-decided` stopped by Ctrl-C after its
    first look; the same command goes on from the stored look, and a third run changes nothing."""
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps({**GRID, "name": "resume"}))
    # margin 0.01 points: nothing is equivalent or futile after 3 seeds, so a second look must happen
    args = [sys.executable, "-m", "orchestrator.cli", "run", str(grid_file), "--until-decided", "--max-seeds", "6",
            "--batch", "3", "--margin", "0.01", "--json"]
    env = {**os.environ, "ABLATE_HOME": str(ablate_home)}
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (ablate_home / "state.db").exists() and bool(looks_table(ablate_home)), timeout=600,
                        every=0.05)
        before = looks_table(ablate_home)
        first.send_signal(signal.SIGINT)
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["look"] for r in before] == [1]   # look 1, one comparison
    assert first.returncode in (0, 130), first_err[-3000:]

    again = ablate(*args[3:], env={"ABLATE_HOME": str(ablate_home)})
    assert again.code == 0, again.err
    after = looks_table(ablate_home)
    assert after[0] == before[0]   # look 1 untouched: not tested again, its α not spent again
    out = again.json
    plan = out["adaptive"]["plan"]
    assert plan["looks"] == [3, 6] and plan["margin"] == 0.01
    decision = out["adaptive"]["decisions"][0]
    assert [r["look"] for r in after] == list(range(1, decision["look"] + 1)), after
    if decision["look"] == 2:   # 6 pairs; α spent only grows
        assert after[1]["n"] == 6 and after[1]["alpha_spent"] >= after[0]["alpha_spent"]
    seeds = {t["seed"] for t in StateStore().grid_trials(out["grid"])}
    assert seeds == set(range(3 * decision["look"]))

    third = ablate(*args[3:], env={"ABLATE_HOME": str(ablate_home)})
    assert third.code == 0 and third.json["executed"] == 0 and looks_table(ablate_home) == after
    row = next(r for r in third.json["comparison"]["rows"] if r["variant"] == "full_preact")
    assert row["decision"] == decision["decision"] and row["p_holm"] is None
    assert third.json["comparison"]["design"] == "paired"   # the plan's looks are paired: so is what the table says
    assert row["sequential"]["look"] == decision["look"] and row["sequential"]["looks"] == 2
    assert row["sequential"]["alpha_spent"] == pytest.approx(after[-1]["alpha_spent"])
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{ablate_home / 'mlflow.db'}")
    parent = StateStore().grid(out["grid"]).mlflow_run_id
    tag = client.get_run(parent).data.tags["ablate.decision.synthetic.8.full_preact"]
    assert tag.startswith(f"{decision['decision']} look={decision['look']}/2")

    other = ablate(*args[3:8], "--max-seeds", "9", "--json", env={"ABLATE_HOME": str(ablate_home)})
    assert other.code == 2 and "already runs under a sequential plan" in other.json["error"]


# --- ablate plan --------------------------------------------------------------------------------------------

def test_plan_matches_statsmodels_and_costs_measured_trial_times(ablate_home):
    from orchestrator.grids import expand_grid
    spec = load_grid({**GRID, "name": "pilot", "variants": ["original", "full_preact", "bn_after_add"],
                      "seeds": 6})
    store = StateStore()
    trials = expand_grid(spec)
    grid_id = spec.grid_id({})
    store.register_grid(grid_id, spec.name, spec.model_dump(mode="json", by_alias=True), trials)
    rng = np.random.default_rng(2)
    seed_effect = rng.normal(0, 1.0, 6)
    for t in trials:
        assert store.claim(t.key, "test")
        value = 10 + seed_effect[t.seed] + rng.normal(0, 0.4) - (0.5 if t.variant == "full_preact" else 0)
        store.finish(t.key, "test", {"status": "finished", "test_error": float(value), "train_loss": 0.5,
                                     "train_error": 5.0, "history": []})
    with sqlite3.connect(ablate_home / "state.db") as db:   # trial times: 60 s each, the baseline's 120 s
        db.execute("UPDATE ablate_attempts SET ended_at = started_at + 60")
        db.execute("UPDATE ablate_attempts SET ended_at = started_at + 120 WHERE trial_key IN "
                   "(SELECT trial_key FROM ablate_grid_trials WHERE variant = 'original')")
    r = ablate("plan", "pilot", "--delta", "0.5", "--power", "0.9", "--json", env={"ABLATE_HOME": str(ablate_home)})
    assert r.code == 0, r.err
    out = r.json
    assert out["comparisons"] == 2 and out["alpha_per_comparison"] == pytest.approx(0.025)
    results = store.results_table(grid_id).to_pylist()
    values = {(x["variant"], x["seed"]): x["test_error"] for x in results}
    for row in out["rows"]:
        d = np.array([values[(row["variant"], s)] - values[("original", s)] for s in range(6)])
        assert row["pairs"] == 6 and row["sd_diff"] == pytest.approx(d.std(ddof=1))
        n = TTestPower().solve_power(effect_size=0.5 / d.std(ddof=1), alpha=0.025, power=0.9)
        assert row["seeds"] == math.ceil(n) and row["more_seeds"] == max(0, math.ceil(n) - 6)
        assert row["seconds_per_trial"] == pytest.approx(60) and row["baseline_seconds_per_trial"] == pytest.approx(120)
        assert row["trial_hours"] == pytest.approx(row["more_seeds"] * 180 / 3600)
        assert row["max_seeds"] >= row["seeds"]
    more = [row["more_seeds"] for row in out["rows"]]
    assert out["total_trial_hours"] == pytest.approx((sum(more) * 60 + max(more) * 120) / 3600)
    text = ablate("plan", "pilot", "--delta", "0.5", env={"ABLATE_HOME": str(ablate_home)})
    assert text.code == 0 and "trial-hours" in text.out and "full_preact" in text.out
    bad = ablate("plan", "pilot", "--delta", "-1", "--json", env={"ABLATE_HOME": str(ablate_home)})
    assert bad.code == 2 and "--delta" in bad.json["error"]
