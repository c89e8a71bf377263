"""Comparison statistics: one row per cell (setting × variant) of a results table, tested against a baseline.

The paper reports the median of 5 runs per cell and no test (He et al. 2016, CIFAR tables). Here every cell
gets its spread, a confidence interval, a difference to the baseline with its own interval, a Holm-corrected
p-value, an effect size, a probability of improvement and a decision. Errors and losses: lower is better.

Input: one row per trial with `dataset, depth, variant, seed, status, test_error, train_loss, train_error`,
as a list of dicts, a pandas DataFrame or a pyarrow Table (converted once to a DataFrame). All confidence
intervals are at level 1 − alpha (95% by default).

Which runs enter the statistics (nothing is dropped silently: `failed` shows every run that is not a clean
result):
- `queued`, `running` and `cancelled` rows are not results yet (or never will be): ignored, except that a
  cell with only such rows still appears, with n = 0.
- `finished` runs enter the sample with their value.
- `diverged` runs enter the sample with their value and are counted in `failed`: the trainer evaluates the
  last finite weights, so the error is a real measurement of what that variant does under that recipe (the
  paper's "fail" rows are exactly such runs). Dropping them would flatter unstable variants.
- `error` runs (crashed after their retries) are counted in `failed` and excluded: they did not complete
  the recipe, so any value they carry is not the comparable end point.
- A finished or diverged run without a finite value of the metric is excluded and counted in `failed`.
- A run whose test error is above `fail_threshold` (the paper's "fail": above 20%) stays in the sample
  and is counted in `failed`. The threshold is the paper's definition, so it is judged on `test_error`
  whatever metric is compared: the `failed` column describes runs, not the metric.
So for every cell: ended runs (finished, diverged, error) ≤ n + failed.

Two designs (dashboards.DEFAULT_DESIGN says which is used unless asked). Welch (the default,
`design="welch"`): the independent-samples analysis, Welch's t (unequal variances: unstable variants spread
more), Δ = difference of the means, P(improvement) = U / (n₁n₂) over all pairs of runs. Paired by seed
(`design="paired"`): seed s of two variants gets bit-identical initial weights for every layer both
networks have (same shapes, same order), the same data order and the same augmentation, so Δ, its CI, p and
P(improvement) may come from the per-seed differences d = variant − baseline over the seeds both have
(exact pairs only; seeds on one side only are listed in `unpaired_seeds`): Δ = mean(d), CI of mean(d)
(Student's t below BOOTSTRAP_MIN_N pairs, BCa bootstrap of the differences from there, as the mean CIs),
p from the paired t-test, P(improvement) = the share of pairs where the variant is lower (ties half).
Both are valid whatever the correlation between the arms; what pairing would gain is measured in every
comparison, in both designs: the Pearson and Spearman correlation of its per-seed values, var(d) against
var₁ + var₂ over the same seeds, and their ratio `pair_efficiency` (how many times the seeds an
independent-samples analysis needs for the CI width of a paired one). Measured on real grids it was about
1 (see dashboards/__init__.py), so the default is Welch; the design is never chosen per table from these
numbers. Hedges' g always standardises by the two arms' pooled SD (over the pairs in the paired design), so
it reads the same in both designs.

Each cell also gives the test set's own sampling error beside the seed spread: `test_se` =
100·sqrt(p(1 − p) / N_test) points for the cell's mean error p, with N_test from the result record's
`test_size` or the dataset's known test size. Every seed is scored on the same test images, so this
error does not shrink with more seeds.

Decisions (lower is better): `better` / `worse` when the Holm-corrected p < alpha and P(improvement) is
beyond 0.75 / below 0.25 in the direction of the mean difference; otherwise `equivalent` when the whole
delta CI lies within ±delta (a CI at 1 − alpha: stricter than the 1 − 2·alpha CI of a TOST at alpha);
otherwise `undecided`. With 5 seeds per cell, as in the paper, `undecided` is a frequent honest answer.
A grid run with `ablate run --until-decided` is decided by its stored sequential plan instead
(dashboards/sequential.py): a fixed-α test of samples that grew because they were undecided made
false differences in up to 7.5% of simulated tables at α = 5% (bench/decisions.py; the plan: 3.7%).

Edge cases, all without NaN: fewer than two values (pairs, in the paired design) → no p-value, delta CI
or effect size, decision `undecided` (the point difference `delta` and `p_improve` are still given when
there is one value, or pair). Zero variance on both sides (of the differences, when paired): the
difference is known exactly, so the delta CI is [d, d] and the p-value 1.0 for equal means, 0.0
otherwise; Hedges' g is 0 for equal means and None (infinite) otherwise.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from ablations.paper import FAIL_THRESHOLD, PAPER_METRICS, paper_value
from ablations.spec import excerpt
from ablations.vocabulary import ENDED, MEASURED, METRICS, STATUSES, TEST_SIZES

from . import DEFAULT_DESIGN, DESIGNS

SETTING_KEYS = ("dataset", "depth")
KEYS = [*SETTING_KEYS, "variant"]

RESULTS_SCHEMA = pa.schema([("dataset", pa.string()), ("depth", pa.int64()), ("variant", pa.string()),
                            ("seed", pa.int64()), ("status", pa.string()), ("test_error", pa.float64()),
                            ("train_loss", pa.float64()), ("train_error", pa.float64()),
                            ("test_size", pa.int64()), ("precision", pa.string()), ("test_error_top5", pa.float64())])

# Mean CIs use Student's t below this many values and a BCa bootstrap from it on (the t-interval leans on
# normality, which small samples cannot check; the bootstrap needs enough values to resample).
BOOTSTRAP_MIN_N = 10
# 1999 resamples: Monte-Carlo error of a BCa end point about 3% of the half-width (below the table's two
# decimals for typical spreads) at a quarter of scipy's default cost, so large tables stay interactive.
BOOTSTRAP_RESAMPLES = 1999
BOOTSTRAP_SEED = 0            # a fresh generator per cell: a cell's interval never depends on the others
BOOTSTRAP_BATCH_VALUES = 2_000_000   # resampled values held at once (16 MB); the result does not depend on it
IMPROVE_THRESHOLD = 0.75      # P(improvement) beyond this (or below 1 − this) for better (worse)

PaperLookup = Callable[[str, int, str], "float | str | None"]


def results_to_arrow(results: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table) -> pa.Table:
    """The results table in Ablate's columns (extra keys dropped, missing ones null)."""
    if isinstance(results, pd.DataFrame):
        results = pa.Table.from_pandas(results, preserve_index=False)
    if not isinstance(results, pa.Table):
        return pa.Table.from_pylist(list(results), schema=RESULTS_SCHEMA)
    return pa.table([results[f.name].cast(f.type) if f.name in results.column_names
                     else pa.nulls(results.num_rows, f.type) for f in RESULTS_SCHEMA], schema=RESULTS_SCHEMA)


def _reference(paper: PaperLookup, setting: tuple[str, int] | None, variant: str, metric: str) -> dict[str, Any]:
    if setting is None or metric not in PAPER_METRICS:
        return {"paper_reference": None, "paper_reference_setting": None}
    value = paper(setting[0], setting[1], variant)
    return {"paper_reference": value, "paper_reference_setting": None if value is None else f"{setting[0]}-{setting[1]}"}


def compare(results: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table, baseline: str,
            metric: str = "test_error", alpha: float = 0.05, delta: float = 0.2,
            fail_threshold: float = FAIL_THRESHOLD, variant_order: list[str] | None = None,
            paper: PaperLookup | None = None, paper_reference: tuple[str, int] | None = None,
            design: str = DEFAULT_DESIGN) -> list[dict[str, Any]]:
    """One JSON-ready row per cell, settings sorted by (dataset, depth), variants in `variant_order`
    (unlisted ones after, by name; without an order: the baseline first, then by name).

    `delta` is the equivalence margin in the metric's units; `paper` gives the paper's figure for a cell in
    that metric (default: ablations.paper's; test errors only, top-1 or top-5). `paper_reference` (dataset,
    depth) names the paper's setting a CPU-scale grid stands in for: rows then also carry the paper's figure
    for their variant there as `paper_reference`, with `paper_reference_setting`, never as `paper`.
    `design`: `paired` (by seed) or `welch` (independent samples); see the module docstring.
    """
    if design not in DESIGNS:
        raise ValueError(f"unknown design {excerpt(design)}; choose one of: {', '.join(DESIGNS)}")
    frame = _frame(results, metric)
    paper = paper or (lambda dataset, depth, variant: paper_value(dataset, depth, variant, metric))
    if frame.empty:
        return []
    if baseline not in set(frame["variant"]):
        raise ValueError(f"baseline {excerpt(baseline)} has no runs; variants: {', '.join(sorted(set(frame['variant'])))}")

    usable, failed = _usable(frame, metric, fail_threshold)
    counts = frame[KEYS].assign(failed=failed).groupby(KEYS, sort=False, observed=True)["failed"].sum()
    samples = _samples(frame, usable, metric)
    sizes = frame.loc[usable].groupby(KEYS, sort=False, observed=True)["test_size"].median()
    precisions = frame.loc[usable].groupby(KEYS, sort=False, observed=True)["precision"].agg(_precision)

    rank = {v: i for i, v in enumerate(variant_order or [baseline])}
    cells = sorted(counts.index, key=lambda c: (c[0], c[1], rank.get(c[2], len(rank)), c[2]))
    rows = []
    for cell in cells:
        dataset, depth, variant = cell
        x = samples.get(cell, _EMPTY)
        row: dict[str, Any] = {"setting": {"dataset": str(dataset), "depth": int(depth)}, "variant": str(variant),
                               "n": int(x.size), "failed": int(counts[cell]),
                               **_describe(x), **_mean_interval(x.to_numpy(), alpha),
                               **_test_error_se(x, sizes.get(cell), dataset, metric),
                               **_NO_COMPARISON,
                               "paper": paper(dataset, int(depth), variant) if metric in PAPER_METRICS else None,
                               **_reference(paper, paper_reference, variant, metric),
                               "seeds": sorted(int(s) for s in x.index), "sequential": None,
                               "precision": precisions.get(cell)}
        if variant == baseline:
            row["decision"] = "baseline"
        elif (dataset, depth, baseline) in counts.index:
            base = samples.get((dataset, depth, baseline), _EMPTY)
            row.update(_pairing(x, base))
            if design == "paired":
                row.update(_paired(x, base, alpha))
            else:
                row.update(_welch(x.to_numpy(), base.to_numpy(), alpha))
        rows.append(row)

    _holm(rows)
    for row in rows:
        if row["decision"] != "baseline":
            row["decision"] = _decide(row, alpha, delta)
    return rows


def paired_differences(results: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table, baseline: str,
                       metric: str = "test_error", fail_threshold: float = FAIL_THRESHOLD,
                       seeds: Iterable[int] | None = None) -> dict[tuple[str, int, str], pd.Series]:
    """Per comparison (dataset, depth, variant), its per-seed differences variant − baseline, indexed by seed:
    the runs that enter `compare`, exact pairs only, restricted to `seeds` when given."""
    frame = _frame(results, metric)
    if frame.empty:
        return {}
    usable, _ = _usable(frame, metric, fail_threshold)
    if seeds is not None:
        usable &= frame["seed"].isin(list(seeds)).to_numpy()
    samples = _samples(frame, usable, metric)
    out = {}
    for (dataset, depth, variant), x in samples.items():
        base = samples.get((dataset, depth, baseline))
        if variant != baseline and base is not None:
            x, b = x.align(base, join="inner")
            out[(dataset, depth, variant)] = (x - b).sort_index()
    return out


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant across settings: mean rank of its mean (1 = lowest, ties averaged; over the settings
    where it has a mean) and wins / ties / losses against the baseline (None for the baseline itself)."""
    order: dict[str, dict[str, Any]] = {}
    ranks: dict[str, list[float]] = {}
    by_setting: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        by_setting.setdefault(tuple(row["setting"].values()), []).append(row)
        entry = order.setdefault(row["variant"], {"variant": row["variant"], "settings": 0, "mean_rank": None,
                                                  "wins": 0, "ties": 0, "losses": 0})
        if row["decision"] == "baseline":
            entry.update(wins=None, ties=None, losses=None)
        elif entry["wins"] is not None:
            outcome = {"better": "wins", "worse": "losses"}.get(row["decision"], "ties")
            entry[outcome] += 1
    for group in by_setting.values():
        ranked = [r for r in group if r["mean"] is not None]
        for r, k in zip(ranked, stats.rankdata([r["mean"] for r in ranked])):
            ranks.setdefault(r["variant"], []).append(float(k))
    for variant, entry in order.items():
        if variant in ranks:
            entry.update(settings=len(ranks[variant]), mean_rank=float(np.mean(ranks[variant])))
    return list(order.values())


# --- input -------------------------------------------------------------------------------------------

def _frame(results: Any, metric: str) -> pd.DataFrame:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {excerpt(metric)}; choose one of: {', '.join(METRICS)}")
    if isinstance(results, pa.Table):
        frame = results.to_pandas()
    elif isinstance(results, pd.DataFrame):
        frame = results
    else:
        frame = pd.DataFrame.from_records(list(results))
    if frame.empty:
        return frame
    missing = [c for c in ("dataset", "depth", "variant", "seed", "status", metric) if c not in frame.columns]
    if missing:
        raise ValueError(f"results lack column(s): {', '.join(missing)}")
    if frame[[*KEYS, "seed"]].isna().any().any():
        raise ValueError("results have rows without dataset, depth, variant or seed")
    unknown = set(frame["status"]) - set(STATUSES)
    if unknown:
        raise ValueError(f"unknown status {sorted(map(str, unknown))}; valid: {', '.join(STATUSES)}")
    out = frame[[*KEYS, "seed", "status"]].reset_index(drop=True)
    for column in METRICS:
        out[column] = frame[column].to_numpy(dtype=float, na_value=np.nan) if column in frame.columns else np.nan
    # The test set's size: the result record's when given, else the dataset's (None when unknown).
    known = out["dataset"].map(TEST_SIZES).to_numpy(dtype=float, na_value=np.nan)
    given = frame["test_size"].to_numpy(dtype=float, na_value=np.nan) if "test_size" in frame.columns else known
    out["test_size"] = np.where(np.isfinite(given), given, known)
    # The precision each run trained in (bf16 autocast or fp32), when its record says.
    out["precision"] = frame["precision"] if "precision" in frame.columns else None
    return out


def _usable(frame: pd.DataFrame, metric: str, fail_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Which runs enter the sample, and which count as failed (see the module docstring)."""
    status = frame["status"]
    value = frame[metric].to_numpy(dtype=float)
    usable = status.isin(MEASURED).to_numpy() & np.isfinite(value)
    too_high = frame["test_error"].to_numpy(dtype=float) > fail_threshold
    failed = status.isin(ENDED).to_numpy() & (status.isin(("diverged", "error")).to_numpy() | ~usable | too_high)
    return usable, failed


def _samples(frame: pd.DataFrame, usable: np.ndarray, metric: str) -> dict[tuple, pd.Series]:
    """Each cell's values indexed by seed. A seed twice in one cell cannot be paired: refused."""
    sample = frame.loc[usable, [*KEYS, "seed", metric]]
    twice = sample.duplicated([*KEYS, "seed"])
    if twice.any():
        first = sample[twice].iloc[0]
        raise ValueError(f"seed {first['seed']} has two results in {first['dataset']} depth {first['depth']} "
                         f"{first['variant']}: a cell holds one run per seed")
    # Sorted by seed: the bootstrap resamples by position, so the same results give the same CI in any order.
    return {cell: pd.Series(group[metric].to_numpy(dtype=float), index=group["seed"].to_numpy(dtype=int)).sort_index()
            for cell, group in sample.groupby(KEYS, sort=False, observed=True)}


# --- per cell ----------------------------------------------------------------------------------------

_EMPTY = pd.Series([], dtype=float)
_NO_COMPARISON = {"delta": None, "delta_ci_low": None, "delta_ci_high": None, "p_value": None, "p_holm": None,
                  "effect_size": None, "p_improve": None, "decision": "undecided", "pairs": None,
                  "unpaired_seeds": [], "pair_pearson": None, "pair_spearman": None, "pair_var_diff": None,
                  "pair_var_sum": None, "pair_efficiency": None}


def _precision(values: pd.Series) -> str | None:
    """A cell's precision: the one its runs share, or "mixed (bf16 ×a, fp32 ×b)" when they differ (a
    table must say so: results need not be equal across precisions), or None when no record says."""
    counts = values.dropna().value_counts().sort_index()
    if counts.empty:
        return None
    if len(counts) == 1:
        return str(counts.index[0])
    return "mixed (" + ", ".join(f"{p} ×{n}" for p, n in counts.items()) + ")"


def _describe(x: pd.Series) -> dict[str, Any]:
    if x.empty:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None}
    v = x.to_numpy()
    return {"mean": float(v.mean()), "std": _num(np.std(v, ddof=1)) if v.size > 1 else None,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def _test_error_se(x: pd.Series, size: float | None, dataset: str, metric: str) -> dict[str, Any]:
    """The binomial sampling error of the cell's mean test error (top-1 or top-5) from the test set's size,
    in points."""
    if metric not in PAPER_METRICS or x.empty or size is None or not np.isfinite(size):
        return {"test_size": int(size) if size is not None and np.isfinite(size) else TEST_SIZES.get(dataset),
                "test_se": None}
    p = min(max(float(x.mean()) / 100, 0.0), 1.0)
    return {"test_size": int(size), "test_se": 100 * math.sqrt(p * (1 - p) / size)}


def _mean_interval(x: np.ndarray, alpha: float) -> dict[str, Any]:
    """Student's t-interval below BOOTSTRAP_MIN_N values, BCa bootstrap from there (t if BCa degenerates)."""
    if x.size < 2:
        return {"ci_low": None, "ci_high": None}
    if np.ptp(x) == 0:   # identical values: test np.ptp, as their float variance need not be exactly 0
        return {"ci_low": float(x[0]), "ci_high": float(x[0])}
    if x.size >= BOOTSTRAP_MIN_N:
        ci = stats.bootstrap((x,), np.mean, confidence_level=1 - alpha, method="BCa",
                             n_resamples=BOOTSTRAP_RESAMPLES, batch=max(1, BOOTSTRAP_BATCH_VALUES // x.size),
                             rng=np.random.default_rng(BOOTSTRAP_SEED)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            return {"ci_low": float(ci.low), "ci_high": float(ci.high)}
    mean = float(np.mean(x))
    half = float(stats.t.ppf(1 - alpha / 2, x.size - 1) * np.std(x, ddof=1) / math.sqrt(x.size))
    return {"ci_low": mean - half, "ci_high": mean + half}


def _hedges_g(x: np.ndarray, base: np.ndarray, d: float) -> float | None:
    """Hedges' g: the difference over the two arms' pooled SD, with the small-sample factor J (Hedges & Olkin
    1985). 0 for no difference, None (infinite) for a difference with no spread."""
    pooled = math.sqrt(((x.size - 1) * np.var(x, ddof=1) + (base.size - 1) * np.var(base, ddof=1))
                       / (x.size + base.size - 2))
    if pooled == 0:
        return 0.0 if d == 0 else None
    return (1 - 3 / (4 * (x.size + base.size) - 9)) * d / pooled


def _pairing(x: pd.Series, base: pd.Series) -> dict[str, Any]:
    """What pairing by seed gains here, over the seeds both arms have: the correlation of their per-seed
    values, var(d) against var₁ + var₂, and the efficiency (var₁ + var₂) / var(d)."""
    xv, bv = x.align(base, join="inner")
    unpaired = sorted(int(s) for s in x.index.symmetric_difference(base.index))
    out: dict[str, Any] = {"pairs": int(xv.size), "unpaired_seeds": unpaired}
    if xv.size < 2:
        return out
    xv, bv = xv.to_numpy(), bv.to_numpy()
    var_diff, var_sum = float(np.var(xv - bv, ddof=1)), float(np.var(xv, ddof=1) + np.var(bv, ddof=1))
    out.update(pair_var_diff=var_diff, pair_var_sum=var_sum,
               pair_efficiency=var_sum / var_diff if var_diff > 0 else None)
    if np.ptp(xv) > 0 and np.ptp(bv) > 0:   # a correlation needs spread on both sides
        out.update(pair_pearson=float(stats.pearsonr(xv, bv).statistic),
                   pair_spearman=float(stats.spearmanr(xv, bv).statistic))
    return out


def _paired(x: pd.Series, base: pd.Series, alpha: float) -> dict[str, Any]:
    """Variant against baseline over the seeds both have: the mean difference with its CI, the paired
    t-test, Hedges' g and the share of seeds where the variant is lower."""
    xv, bv = x.align(base, join="inner")
    if xv.empty:
        return {}
    xv, bv = xv.to_numpy(), bv.to_numpy()
    d = xv - bv
    mean = float(d.mean())
    out: dict[str, Any] = {"delta": mean, "p_improve": float(((d < 0).sum() + 0.5 * (d == 0).sum()) / d.size)}
    if d.size < 2:
        return out
    ci = _mean_interval(d, alpha)
    p = (1.0 if mean == 0 else 0.0) if np.ptp(d) == 0 else float(stats.ttest_rel(xv, bv).pvalue)
    out.update(delta_ci_low=ci["ci_low"], delta_ci_high=ci["ci_high"], p_value=p,
               effect_size=_hedges_g(xv, bv, mean))
    return out


def _welch(x: np.ndarray, base: np.ndarray, alpha: float) -> dict[str, Any]:
    """Variant sample x against the baseline sample: Welch difference, Hedges' g, P(improvement)."""
    if x.size == 0 or base.size == 0:
        return {}
    d = float(np.mean(x) - np.mean(base))
    # P(a variant run has a lower metric than a baseline run), ties counted half: U / (n1 n2).
    ordered = np.sort(base)
    below, above = np.searchsorted(ordered, x, "left"), np.searchsorted(ordered, x, "right")
    lower = (base.size - above).sum() + 0.5 * (above - below).sum()
    out: dict[str, Any] = {"delta": d, "p_improve": float(lower / (x.size * base.size))}
    if x.size < 2 or base.size < 2:
        return out
    if np.ptp(x) == 0 and np.ptp(base) == 0:   # the difference is known exactly
        d = float(x[0] - base[0])
        out.update(delta=d, delta_ci_low=d, delta_ci_high=d, p_value=1.0 if d == 0 else 0.0,
                   effect_size=0.0 if d == 0 else None)
        return out
    v1, v0 = float(np.var(x, ddof=1)), float(np.var(base, ddof=1))
    se = math.sqrt(v1 / x.size + v0 / base.size)
    # Welch–Satterthwaite degrees of freedom
    df = se ** 4 / ((v1 / x.size) ** 2 / (x.size - 1) + (v0 / base.size) ** 2 / (base.size - 1))
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    out.update(delta_ci_low=d - half, delta_ci_high=d + half, effect_size=_hedges_g(x, base, d),
               p_value=float(stats.ttest_ind(x, base, equal_var=False).pvalue))
    return out


# --- across the table --------------------------------------------------------------------------------

def _holm(rows: list[dict[str, Any]]) -> None:
    """Holm's step-down correction over every non-baseline comparison of the table that has a p-value.

    The same numbers as statsmodels' `multipletests(method="holm")` (the tests check it), written out
    because that function runs a full `gc.collect()` on every call: 70 ms here, more in a server process.
    """
    tested = [r for r in rows if r["p_value"] is not None]
    p = np.array([r["p_value"] for r in tested])
    order = np.argsort(p, kind="stable")
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(p[order] * np.arange(p.size, 0, -1)))
    for row, q in zip(tested, adjusted):
        row["p_holm"] = float(q)


def _decide(row: dict[str, Any], alpha: float, margin: float) -> str:
    """better / worse: Holm-significant and the variant beats (loses to) a baseline run in more than 75%
    of pairs, in the direction of the mean difference; equivalent: the whole delta CI within ±margin."""
    if row["p_holm"] is not None and row["p_holm"] < alpha:
        if row["p_improve"] > IMPROVE_THRESHOLD and row["delta"] < 0:
            return "better"
        if row["p_improve"] < 1 - IMPROVE_THRESHOLD and row["delta"] > 0:
            return "worse"
    if row["delta_ci_low"] is not None and -margin <= row["delta_ci_low"] and row["delta_ci_high"] <= margin:
        return "equivalent"
    return "undecided"


def _num(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None
