"""dashboards.stats: every statistic against scipy / statsmodels computed here, decisions at their edges,
failed-run handling, the paper column, ordering and the across-settings summary."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from dashboards.stats import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, RESULTS_SCHEMA, compare, paired_differences,
                              results_to_arrow, summary)
from dashboards.tables import document, render

BASE = [6.61, 6.72, 6.48, 6.90, 6.55]
FIELDS = {"setting", "variant", "n", "failed", "mean", "std", "median", "min", "max", "ci_low", "ci_high", "delta",
          "delta_ci_low", "delta_ci_high", "p_value", "p_holm", "effect_size", "p_improve", "decision", "paper",
          "seeds", "paper_reference", "paper_reference_setting", "test_size", "test_se", "pairs", "unpaired_seeds",
          "pair_pearson", "pair_spearman", "pair_var_diff", "pair_var_sum", "pair_efficiency", "sequential", "precision"}


def trials(variant: str, values, *, dataset="cifar10", depth=110, status="finished", seed0=0) -> list[dict]:
    return [dict(dataset=dataset, depth=depth, variant=variant, seed=seed0 + i, status=status, test_error=v,
                 train_loss=None if v is None else v / 10, train_error=None if v is None else v / 2)
            for i, v in enumerate(values)]


def cell(rows: list[dict], variant: str, depth: int = 110, dataset: str = "cifar10") -> dict:
    [row] = [r for r in rows if r["variant"] == variant and r["setting"] == {"dataset": dataset, "depth": depth}]
    return row


def pair(values, base=BASE, design="paired", **kw) -> dict:
    """The variant's row; paired unless asked (most tests here are of the per-seed analysis; the default
    design of `compare` is tested apart)."""
    return cell(compare(trials("original", base) + trials("v", values), "original", design=design, **kw), "v")


def plain(x) -> bool:
    if isinstance(x, dict):
        return all(plain(v) for v in x.values())
    if isinstance(x, list):
        return all(plain(v) for v in x)
    return x is None or type(x) in (int, float, str, bool)


# --- statistics against independent computations -----------------------------------------------------

def test_row_fields_descriptives_and_t_interval():
    rows = compare(trials("original", BASE), "original")
    [row] = rows
    assert set(row) == FIELDS and plain(row)
    x = np.array(BASE)
    assert row["n"] == 5 and row["failed"] == 0 and row["seeds"] == [0, 1, 2, 3, 4]
    assert row["mean"] == pytest.approx(x.mean()) and row["std"] == pytest.approx(x.std(ddof=1))
    assert (row["median"], row["min"], row["max"]) == (6.61, 6.48, 6.90)
    low, high = stats.t.interval(0.95, df=4, loc=x.mean(), scale=stats.sem(x))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert row["decision"] == "baseline" and row["delta"] is None and row["p_holm"] is None


def test_bca_bootstrap_from_ten_runs_t_below():
    x = np.round(np.random.default_rng(7).gamma(2.0, 0.3, 12) + 6, 3)
    row = cell(compare(trials("original", x), "original"), "original")
    ref = stats.bootstrap((x,), np.mean, method="BCa", n_resamples=BOOTSTRAP_RESAMPLES,
                          rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert compare(trials("original", x), "original") == compare(trials("original", x), "original")  # deterministic
    nine = cell(compare(trials("original", x[:9]), "original"), "original")
    low, high = stats.t.interval(0.95, df=8, loc=x[:9].mean(), scale=stats.sem(x[:9]))
    assert (nine["ci_low"], nine["ci_high"]) == (pytest.approx(low), pytest.approx(high))


def test_welch_p_value_and_interval_by_hand():
    x = np.array([6.1, 6.4, 5.9, 6.3, 6.0, 6.6, 6.2, 5.8])
    b = np.array(BASE)
    row = pair(x, design="welch")
    assert row["p_value"] == pytest.approx(stats.ttest_ind(x, b, equal_var=False).pvalue)
    a1, a0 = x.var(ddof=1) / x.size, b.var(ddof=1) / b.size
    df = (a1 + a0) ** 2 / (a1 ** 2 / (x.size - 1) + a0 ** 2 / (b.size - 1))   # Welch–Satterthwaite
    d, half = x.mean() - b.mean(), stats.t.ppf(0.975, df) * math.sqrt(a1 + a0)
    assert row["delta"] == pytest.approx(d)
    assert (row["delta_ci_low"], row["delta_ci_high"]) == (pytest.approx(d - half), pytest.approx(d + half))


def test_hedges_g_formula_and_sign():
    x, b = np.array([6.1, 6.4, 5.9, 6.3]), np.array(BASE)
    pooled = math.sqrt(((x.size - 1) * x.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (x.size + b.size - 2))
    j = 1 - 3 / (4 * (x.size + b.size) - 9)
    g = pair(x, design="welch")["effect_size"]
    assert g == pytest.approx(j * (x.mean() - b.mean()) / pooled) and g < 0   # lower error: negative
    assert pair(x + 1.5, design="welch")["effect_size"] > 0
    # paired: the same formula over the seeds both arms have (seeds 0-3 of the baseline)
    b4 = b[:4]
    pooled = math.sqrt((x.var(ddof=1) + b4.var(ddof=1)) / 2)
    j = 1 - 3 / (4 * 8 - 9)
    assert pair(x)["effect_size"] == pytest.approx(j * (x.mean() - b4.mean()) / pooled)


def test_p_improve_is_u_over_n1n2_with_ties_half():
    x, b = [6.0, 6.5, 6.55, 6.9, 7.0], BASE
    expected = stats.mannwhitneyu(b, x).statistic / (len(x) * len(b))   # U of "baseline above variant"
    lower = sum(xi < bi for xi in x for bi in b) + 0.5 * sum(xi == bi for xi in x for bi in b)
    assert pair(x, design="welch")["p_improve"] == pytest.approx(expected) == pytest.approx(lower / 25)
    assert pair(BASE, design="welch")["p_improve"] == 0.5   # identical samples: every comparison is a tie or mirrored
    # paired: the share of seeds where the variant is lower, ties half: lower on seeds 0 and 1, tied on 3
    assert pair(x)["p_improve"] == pytest.approx(2.5 / 5)
    assert pair(BASE)["p_improve"] == 0.5


def test_holm_across_the_whole_table_matches_statsmodels():
    rng = np.random.default_rng(3)
    results = []
    for depth in (20, 56):
        results += trials("original", 6.6 + rng.normal(0, 0.2, 5), depth=depth)
        for shift, name in ((-0.5, "a"), (0.05, "b"), (0.3, "c")):
            results += trials(name, 6.6 + shift + rng.normal(0, 0.2, 5), depth=depth)
    rows = compare(results, "original")
    tested = [r for r in rows if r["decision"] != "baseline"]
    assert len(tested) == 6
    expected = multipletests([r["p_value"] for r in tested], method="holm")[1]
    assert [r["p_holm"] for r in tested] == pytest.approx(list(expected))


# --- decisions ---------------------------------------------------------------------------------------

def test_clear_differences_are_better_and_worse():
    assert pair([5.9, 6.0, 5.8, 6.1, 5.95])["decision"] == "better"
    assert pair([8.1, 8.3, 7.9, 8.2, 8.0])["decision"] == "worse"


def test_identical_distribution_with_tight_spread_is_equivalent():
    base = [6.60, 6.62, 6.58, 6.61, 6.59, 6.60]
    row = pair([6.61, 6.59, 6.60, 6.62, 6.58, 6.60], base=base)
    assert row["decision"] == "equivalent" and -0.2 <= row["delta_ci_low"] <= row["delta_ci_high"] <= 0.2
    assert pair([6.61, 6.59, 6.60, 6.62, 6.58, 6.60], base=base, delta=0.01)["decision"] == "undecided"


def test_equivalence_needs_the_whole_interval_inside_the_margin():
    row = pair([v - 0.1 for v in BASE], design="welch")   # point difference inside ±0.2, lower CI end outside
    assert -0.2 < row["delta"] < 0 and row["delta_ci_low"] < -0.2 < row["delta_ci_high"] < 0.2
    assert row["decision"] == "undecided"
    # paired, the same samples are a constant shift of -0.1 on every seed: known exactly, inside the margin
    paired = pair([v - 0.1 for v in BASE])
    assert paired["delta_ci_low"] == paired["delta_ci_high"] == pytest.approx(-0.1)
    assert paired["decision"] == "better"


def test_small_noisy_samples_are_undecided():
    row = pair([5.0, 8.0, 6.0])
    assert row["decision"] == "undecided" and row["p_value"] > 0.05


def test_one_run_gives_a_point_difference_and_no_inference():
    assert pair([6.0])["delta"] == pytest.approx(6.0 - BASE[0])   # paired: seed 0 against seed 0
    row = pair([6.0], design="welch")
    assert row["delta"] == pytest.approx(6.0 - np.mean(BASE)) and row["p_improve"] == 1.0
    assert row["p_value"] is row["p_holm"] is row["delta_ci_low"] is row["effect_size"] is None
    assert row["decision"] == "undecided" and row["std"] is None and row["ci_low"] is None


def test_p_improve_threshold_edge():
    base = list(10 + np.linspace(-0.05, 0.05, 12))
    at_edge = pair([0.0] * 9 + [11.0] * 3, base=base)   # beats 9 of 12 baseline runs: exactly 0.75
    assert at_edge["p_holm"] < 0.05 and at_edge["p_improve"] == 0.75 and at_edge["decision"] == "undecided"
    beyond = pair([0.0] * 10 + [11.0] * 2, base=base)
    assert beyond["p_improve"] == pytest.approx(10 / 12) and beyond["decision"] == "better"
    worse_edge = pair([20.0] * 9 + [9.0] * 3, base=base)   # P(improvement) exactly 0.25
    assert worse_edge["p_holm"] < 0.05 and worse_edge["p_improve"] == 0.25 and worse_edge["decision"] == "undecided"
    assert pair([20.0] * 10 + [9.0] * 2, base=base)["decision"] == "worse"


def test_direction_must_agree_with_the_mean_difference():
    # Most runs slightly better, a few catastrophic: P(improvement) 0.8 but the mean is significantly worse.
    base = list(10 + np.linspace(-0.05, 0.05, 40))
    row = pair([9.9] * 32 + [30.0] * 8, base=base)
    assert row["p_holm"] < 0.05 and row["p_improve"] == pytest.approx(0.8) and row["delta"] > 0
    assert row["decision"] == "undecided"


def test_zero_variance_on_both_sides_leaks_no_nan():
    same = pair([6.5] * 4, base=[6.5] * 7)
    assert same["p_value"] == 1.0 and same["delta_ci_low"] == same["delta_ci_high"] == same["delta"] == 0.0
    assert same["effect_size"] == 0.0 and same["decision"] == "equivalent" and same["ci_low"] == same["ci_high"] == 6.5
    apart = pair([6.1] * 4, base=[6.5] * 7)
    assert apart["p_value"] == 0.0 and apart["delta_ci_low"] == apart["delta_ci_high"] == pytest.approx(-0.4)
    assert apart["effect_size"] is None and apart["decision"] == "better"
    json.dumps([same, apart], allow_nan=False)


# --- which runs enter --------------------------------------------------------------------------------

def test_failed_runs_are_counted_and_only_measured_values_enter():
    results = (trials("original", BASE)
               + trials("v", [6.2, 6.3, 6.1], seed0=0)
               + trials("v", [35.0], status="diverged", seed0=3)      # kept with its value, counted
               + trials("v", [None], status="diverged", seed0=4)      # no value: excluded, counted
               + trials("v", [5.0], status="error", seed0=5)          # crashed: excluded, counted
               + trials("v", [None], status="error", seed0=6)
               + trials("v", [21.0], seed0=7)                         # finished above 20%: kept, counted
               + trials("v", [None], seed0=8)                         # finished without a value: counted
               + trials("v", [1.0], status="running", seed0=9)        # not results: ignored
               + trials("v", [None], status="queued", seed0=10)
               + trials("v", [None], status="cancelled", seed0=11))
    row = cell(compare(results, "original"), "v")
    assert row["seeds"] == [0, 1, 2, 3, 7] and row["n"] == 5 and row["failed"] == 6
    assert row["max"] == 35.0 and row["mean"] == pytest.approx(np.mean([6.2, 6.3, 6.1, 35.0, 21.0]))
    assert cell(compare(results, "original", fail_threshold=40.0), "v")["failed"] == 5


def test_fail_threshold_is_judged_on_test_error_whatever_the_metric():
    results = trials("original", BASE) + trials("v", [25.0, 26.0])
    row = cell(compare(results, "original", metric="train_loss"), "v")
    assert row["failed"] == 2 and row["mean"] == pytest.approx(2.55) and row["paper"] is None


def test_cells_without_results_yet_still_appear():
    results = trials("original", BASE) + trials("v", [None, None], status="queued")
    row = cell(compare(results, "original"), "v")
    assert row["n"] == 0 and row["failed"] == 0 and row["mean"] is None and row["seeds"] == []
    assert row["decision"] == "undecided" and plain(row)


def test_setting_without_its_baseline_is_undecided():
    results = trials("original", BASE, depth=20) + trials("v", [6.0, 6.1, 5.9], depth=20) + trials("v", BASE, depth=56)
    row = cell(compare(results, "original"), "v", depth=56)
    assert row["delta"] is None and row["p_value"] is None and row["decision"] == "undecided"


# --- paper column, ordering, inputs ------------------------------------------------------------------

def test_paper_column_numbers_fail_and_none():
    results = trials("original", BASE) + trials("full_preact", BASE) + trials("scale-0", [80.0, 85.0])
    results += trials("mine", BASE) + trials("original", BASE, depth=20)
    rows = compare(results, "original")
    assert cell(rows, "original")["paper"] == 6.61 and cell(rows, "full_preact")["paper"] == 6.37
    assert cell(rows, "scale-0")["paper"] == "fail" and cell(rows, "mine")["paper"] is None
    assert cell(rows, "original", depth=20)["paper"] is None
    custom = compare(results, "original", paper=lambda dataset, depth, variant: f"{variant}@{depth}")
    assert cell(custom, "mine")["paper"] == "mine@110"


def test_a_stand_in_grid_shows_the_reference_setting_labelled_never_as_its_own_paper_figure():
    results = trials("original", BASE, depth=20) + trials("scale-0.5", [9.0, 9.5, 10.0], depth=20)
    results += trials("mine", BASE, depth=20)
    rows = compare(results, "original", paper_reference=("cifar10", 110))
    assert all(row["paper"] is None for row in rows)  # fashion-mnist-20 is not a cell of the paper
    assert cell(rows, "original", depth=20)["paper_reference"] == 6.61
    assert cell(rows, "scale-0.5", depth=20)["paper_reference"] == "fail"
    assert cell(rows, "original", depth=20)["paper_reference_setting"] == "cifar10-110"
    assert cell(rows, "mine", depth=20)["paper_reference"] is None
    assert cell(rows, "mine", depth=20)["paper_reference_setting"] is None
    assert all(row["paper_reference"] is None for row in compare(results, "original"))
    text = render(document("g", "test_error", rows), "markdown")
    assert "6.61 (cifar10-110)" in text and "fail (cifar10-110)" in text
    flat = pq.read_table(io.BytesIO(render(document("g", "test_error", rows), "parquet"))).to_pylist()
    by_variant = {r["variant"]: r for r in flat}
    assert by_variant["original"]["paper_reference"] == 6.61 and by_variant["original"]["paper"] is None
    assert by_variant["scale-0.5"]["paper_reference_fail"] is True
    assert by_variant["scale-0.5"]["paper_reference_setting"] == "cifar10-110"


def test_rows_follow_the_settings_then_variant_order():
    results = []
    for depth in (110, 20):
        for v in ("zeta", "full_preact", "original", "alpha", "bn_after_add"):
            results += trials(v, BASE, depth=depth)
    results += trials("original", BASE, dataset="cifar100", depth=20)
    rows = compare(results, "original", variant_order=["original", "bn_after_add", "full_preact"])
    order = [(r["setting"]["dataset"], r["setting"]["depth"], r["variant"]) for r in rows]
    expected = [("cifar10", d, v) for d in (20, 110)
                for v in ("original", "bn_after_add", "full_preact", "alpha", "zeta")] + [("cifar100", 20, "original")]
    assert order == expected
    unordered = [r["variant"] for r in compare(results, "original")][:5]
    assert unordered == ["original", "alpha", "bn_after_add", "full_preact", "zeta"]


def test_list_dataframe_and_arrow_inputs_agree():
    results = trials("original", BASE) + trials("v", [6.2, 6.3, None], status="diverged") + [
        dict(dataset="cifar10", depth=110, variant="v", seed=9, status="running", extra="ignored")]
    table = results_to_arrow(results)
    assert table.schema == RESULTS_SCHEMA and table.num_rows == len(results)
    frame = pd.DataFrame(results, index=range(100, 100 + len(results))).astype({"variant": "category"})
    expected = compare(results, "original")
    assert compare(table, "original") == compare(frame, "original") == expected
    assert results_to_arrow(frame).schema == RESULTS_SCHEMA
    assert results_to_arrow(table.select(["dataset", "depth", "variant", "seed", "status", "test_error"])) == table \
        .set_column(6, "train_loss", pa.nulls(len(results), pa.float64())) \
        .set_column(7, "train_error", pa.nulls(len(results), pa.float64()))


def test_bad_input_is_refused_with_a_reason():
    results = trials("original", BASE)
    with pytest.raises(ValueError, match="metric"):
        compare(results, "original", metric="accuracy")
    with pytest.raises(ValueError, match="baseline 'nope'"):
        compare(results, "nope")
    with pytest.raises(ValueError, match="status"):
        compare(trials("original", BASE, status="done"), "original")
    with pytest.raises(ValueError, match="seed"):
        compare([{k: v for k, v in r.items() if k != "seed"} for r in results], "original")
    assert compare([], "original") == [] and compare(results_to_arrow([]), "original") == []


# --- across settings ---------------------------------------------------------------------------------

def test_summary_ranks_and_win_tie_loss():
    results = []
    for depth, (good, tie) in ((20, (5.0, 6.6)), (56, (5.0, 6.0)), (110, (9.0, 6.62))):
        results += trials("original", BASE, depth=depth)
        results += trials("good", [good + d for d in (0.0, 0.1, -0.1, 0.05, -0.05)], depth=depth)
        results += trials("tie", [tie + d for d in (0.0, 0.1, -0.1, 0.05, -0.05)], depth=depth)
    results += trials("tie", [7.0], depth=200) + trials("original", [7.0], depth=200)   # equal means: ranks 1.5
    rows = compare(results, "original")
    assert [cell(rows, "good", d)["decision"] for d in (20, 56, 110)] == ["better", "better", "worse"]
    got = {s["variant"]: s for s in summary(rows)}
    # ranks of (original, good, tie) by mean: 20 → (3, 1, 2), 56 → (3, 1, 2), 110 → (2, 3, 1), 200 → (1.5, –, 1.5)
    assert got["original"] == {"variant": "original", "settings": 4, "wins": None, "ties": None, "losses": None,
                               "mean_rank": pytest.approx((3 + 3 + 2 + 1.5) / 4)}
    assert got["good"] == {"variant": "good", "settings": 3, "mean_rank": pytest.approx((1 + 1 + 3) / 3),
                           "wins": 2, "ties": 0, "losses": 1}
    assert got["tie"]["mean_rank"] == pytest.approx((2 + 2 + 1 + 1.5) / 4)
    assert (got["tie"]["wins"], got["tie"]["ties"], got["tie"]["losses"]) == (1, 3, 0)
    assert [s["variant"] for s in summary(rows)] == ["original", "good", "tie"]


# --- paired design -----------------------------------------------------------------------------------

def test_paired_difference_ci_and_p_match_scipy():
    x = np.array([6.1, 6.4, 5.9, 6.3, 6.0])
    b = np.array(BASE)
    row = pair(x)
    d = x - b
    ref = stats.ttest_1samp(d, 0.0)
    ci = ref.confidence_interval(0.95)
    assert row["delta"] == pytest.approx(d.mean())
    assert (row["delta_ci_low"], row["delta_ci_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert row["p_value"] == pytest.approx(stats.ttest_rel(x, b).pvalue) == pytest.approx(ref.pvalue)
    # textbook: mean(d) ± t(0.975, n − 1) · sd(d) / √n
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert row["delta_ci_high"] - row["delta_ci_low"] == pytest.approx(2 * half)
    assert row["pairs"] == 5 and row["unpaired_seeds"] == []


def test_paired_bca_bootstrap_of_the_differences_from_ten_pairs():
    rng = np.random.default_rng(11)
    seed_effect = rng.normal(0, 1.0, 12)
    b = np.round(6.6 + seed_effect + rng.normal(0, 0.2, 12), 3)
    x = np.round(6.3 + seed_effect + rng.normal(0, 0.2, 12), 3)
    row = pair(x, base=b)
    ref = stats.bootstrap((x - b,), np.mean, method="BCa", n_resamples=BOOTSTRAP_RESAMPLES,
                          rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
    assert (row["delta_ci_low"], row["delta_ci_high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    # the common seed effect cancels in the pairs: a far narrower interval than independent samples give
    welch = pair(x, base=b, design="welch")
    assert row["delta_ci_high"] - row["delta_ci_low"] < 0.5 * (welch["delta_ci_high"] - welch["delta_ci_low"])
    assert row["pair_efficiency"] > 4 and row["decision"] == "better" and welch["decision"] == "undecided"


def test_only_exact_pairs_enter_and_unmatched_seeds_are_listed():
    results = (trials("original", BASE)
               + trials("v", [6.0, 6.2], seed0=0) + trials("v", [5.0], status="error", seed0=2)
               + trials("v", [6.3, 6.1, 6.5], seed0=3))                       # seed 5 has no baseline
    row = cell(compare(results, "original", design="paired"), "v")
    paired = [0, 1, 3, 4]
    d = np.array([6.0, 6.2, 6.3, 6.1]) - np.array(BASE)[paired]
    assert row["pairs"] == 4 and row["unpaired_seeds"] == [2, 5] and row["seeds"] == [0, 1, 3, 4, 5]
    assert row["delta"] == pytest.approx(d.mean()) and row["n"] == 5
    assert row["p_value"] == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert row["p_improve"] == pytest.approx(np.mean(d < 0))


def test_pairing_measurement_against_numpy_and_scipy():
    x = np.array([6.1, 6.4, 5.9, 6.3, 6.0, 6.6])
    b = np.array([6.61, 6.72, 6.48, 6.90, 6.55, 6.95])
    for design in ("paired", "welch"):   # measured in both designs: the design never follows from it
        row = pair(x, base=b, design=design)
        assert row["pair_pearson"] == pytest.approx(np.corrcoef(x, b)[0, 1])
        assert row["pair_spearman"] == pytest.approx(stats.spearmanr(x, b).statistic)
        assert row["pair_var_diff"] == pytest.approx(np.var(x - b, ddof=1))
        assert row["pair_var_sum"] == pytest.approx(np.var(x, ddof=1) + np.var(b, ddof=1))
        assert row["pair_efficiency"] == pytest.approx(row["pair_var_sum"] / row["pair_var_diff"])
    constant = pair([6.0] * 5)   # no spread on one side: no correlation, the rest still measured
    assert constant["pair_pearson"] is None and constant["pair_var_diff"] > 0


def test_designs_are_named_and_a_seed_twice_in_a_cell_is_refused():
    with pytest.raises(ValueError, match="design"):
        compare(trials("original", BASE), "original", design="pooled")
    with pytest.raises(ValueError, match="seed 0 has two results"):
        compare(trials("original", BASE) + trials("original", [6.0]), "original")


def test_paired_differences_follow_compare_and_restrict_to_seeds():
    results = trials("original", BASE) + trials("v", [6.0, 6.2, 6.1, 6.3, 6.4]) + trials("v", [9.0], status="error",
                                                                                       seed0=5)
    diffs = paired_differences(results, "original")
    assert list(diffs) == [("cifar10", 110, "v")]
    assert list(diffs[("cifar10", 110, "v")].index) == [0, 1, 2, 3, 4]
    some = paired_differences(results, "original", seeds=[1, 3, 5])[("cifar10", 110, "v")]
    assert list(some.index) == [1, 3] and list(some) == pytest.approx([6.2 - 6.72, 6.3 - 6.90])


# --- the test set's own sampling error ----------------------------------------------------------------

def test_test_set_sampling_error_from_the_record_or_the_dataset():
    rows = compare(trials("original", BASE), "original")
    p = np.mean(BASE) / 100
    assert rows[0]["test_size"] == 10_000 and rows[0]["test_se"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 1e4))
    given = [dict(r, test_size=2500) for r in trials("original", BASE)]
    assert compare(given, "original")[0]["test_se"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 2500))
    synthetic = compare(trials("original", BASE, dataset="synthetic"), "original")[0]
    assert synthetic["test_size"] == 1000
    unknown = compare(trials("original", BASE, dataset="mine"), "original")[0]
    assert unknown["test_size"] is None and unknown["test_se"] is None
    assert compare(trials("original", BASE), "original", metric="train_loss")[0]["test_se"] is None


def test_dataset_test_sizes_match_the_loader():
    from ablations.vocabulary import TEST_SIZES
    from workers.data import load_dataset
    assert len(load_dataset("synthetic").test.y) == TEST_SIZES["synthetic"]


def test_welch_is_the_default_design():
    """The pairing measurement on real runs found no correlation to remove (dashboards/__init__.py)."""
    x = [6.1, 6.4, 5.9, 6.3]
    default = cell(compare(trials("original", BASE) + trials("v", x), "original"), "v")
    assert default == pair(x, design="welch") and default != pair(x, design="paired")
    assert default["p_value"] == pytest.approx(stats.ttest_ind(x, BASE, equal_var=False).pvalue)
