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

Independent samples, Welch's test (not a paired test). Seed s of two variants shares the data order and
augmentation stream, but the networks differ, so their initialisations differ. Run-to-run variance of a
trained network's test error is dominated by chaotic training dynamics: any one source of randomness alone
(initialisation, data order, augmentation, even non-deterministic kernels) reproduces nearly all of it
(Summers & Dinneen 2021, "Nondeterminism and instability in neural network optimization"). With the
initialisation different, sharing the data stream leaves the two runs close to independent, so a paired
test gains little correlation and loses half the degrees of freedom (n − 1 instead of about 2n − 2). It
also needs both members of every pair: a crashed run or an extra seed on one side breaks pairs. Welch's t
(unequal variances: unstable variants spread more) is valid whether or not the pairing carries
information: a positive correlation would make it conservative, never anti-conservative, and no mechanism
in how seeds are shared suggests a negative one.

Decisions (lower is better): `better` / `worse` when the Holm-corrected p < alpha and P(improvement) is
beyond 0.75 / below 0.25 in the direction of the mean difference; otherwise `equivalent` when the whole
delta CI lies within ±delta (a CI at 1 − alpha: stricter than the 1 − 2·alpha CI of a TOST at alpha);
otherwise `undecided`. With 5 seeds per cell, as in the paper, `undecided` is a frequent honest answer.

Edge cases, all without NaN: fewer than two values on either side → no p-value, delta CI or effect size,
decision `undecided` (the point difference `delta` and `p_improve` are still given when both sides have a
value). Zero variance on both sides: the difference is known exactly, so the delta CI is [d, d] and the
p-value 1.0 for equal means, 0.0 otherwise; Hedges' g is 0 for equal means and None (infinite) otherwise.
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

STATUSES = ("queued", "running", "finished", "diverged", "error", "cancelled")
ENDED = ("finished", "diverged", "error")   # terminal states that should have produced a result
MEASURED = ("finished", "diverged")         # terminal states whose value is a result
METRICS = ("test_error", "test_error_top5", "train_loss", "train_error")
SETTING_KEYS = ("dataset", "depth")
KEYS = [*SETTING_KEYS, "variant"]

RESULTS_SCHEMA = pa.schema([("dataset", pa.string()), ("depth", pa.int64()), ("variant", pa.string()),
                            ("seed", pa.int64()), ("status", pa.string()), ("test_error", pa.float64()),
                            ("train_loss", pa.float64()), ("train_error", pa.float64()),
                            ("test_error_top5", pa.float64())])

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
    if setting is None or metric != "test_error":
        return {"paper_reference": None, "paper_reference_setting": None}
    value = paper(setting[0], setting[1], variant)
    return {"paper_reference": value, "paper_reference_setting": None if value is None else f"{setting[0]}-{setting[1]}"}


def compare(results: Iterable[Mapping[str, Any]] | pd.DataFrame | pa.Table, baseline: str,
            metric: str = "test_error", alpha: float = 0.05, delta: float = 0.2,
            fail_threshold: float = FAIL_THRESHOLD, variant_order: list[str] | None = None,
            paper: PaperLookup | None = None, paper_reference: tuple[str, int] | None = None) -> list[dict[str, Any]]:
    """One JSON-ready row per cell, settings sorted by (dataset, depth), variants in `variant_order`
    (unlisted ones after, by name; without an order: the baseline first, then by name).

    `delta` is the equivalence margin in the metric's units; `paper` gives the paper's figure for a cell in
    that metric (default: ablations.paper's; test errors only, top-1 or top-5). `paper_reference` (dataset,
    depth) names the paper's setting a CPU-scale grid stands in for: rows then also carry the paper's figure
    for their variant there as `paper_reference`, with `paper_reference_setting`, never as `paper`.
    """
    frame = _frame(results, metric)
    paper = paper or (lambda dataset, depth, variant: paper_value(dataset, depth, variant, metric))
    if frame.empty:
        return []
    if baseline not in set(frame["variant"]):
        raise ValueError(f"baseline {baseline!r} has no runs; variants: {', '.join(sorted(set(frame['variant'])))}")

    status = frame["status"]
    value = frame[metric].to_numpy(dtype=float)
    usable = status.isin(MEASURED).to_numpy() & np.isfinite(value)
    too_high = frame["test_error"].to_numpy(dtype=float) > fail_threshold
    failed = status.isin(ENDED).to_numpy() & (status.isin(("diverged", "error")).to_numpy() | ~usable | too_high)
    counts = frame[KEYS].assign(failed=failed).groupby(KEYS, sort=False, observed=True)["failed"].sum()

    sample = frame.loc[usable, [*KEYS, "seed"]].assign(value=value[usable])
    grouped = sample.groupby(KEYS, sort=False, observed=True)
    described = grouped["value"].agg(["mean", "std", "median", "min", "max"])
    indices = grouped.indices
    values = {cell: sample["value"].to_numpy()[idx] for cell, idx in indices.items()}
    seeds = {cell: np.sort(sample["seed"].to_numpy()[idx]).astype(int).tolist() for cell, idx in indices.items()}

    rank = {v: i for i, v in enumerate(variant_order or [baseline])}
    cells = sorted(counts.index, key=lambda c: (c[0], c[1], rank.get(c[2], len(rank)), c[2]))
    rows = []
    for cell in cells:
        dataset, depth, variant = cell
        x = values.get(cell, np.empty(0))
        row: dict[str, Any] = {"setting": {"dataset": str(dataset), "depth": int(depth)}, "variant": str(variant),
                               "n": int(x.size), "failed": int(counts[cell]),
                               **_describe(described.loc[cell] if x.size else None),
                               **_mean_interval(x, alpha), **_NO_COMPARISON,
                               "paper": paper(dataset, int(depth), variant) if metric in PAPER_METRICS else None,
                               **_reference(paper, paper_reference, variant, metric),
                               "seeds": seeds.get(cell, [])}
        if variant == baseline:
            row["decision"] = "baseline"
        elif (dataset, depth, baseline) in counts.index:
            row.update(_versus(x, values.get((dataset, depth, baseline), np.empty(0)), alpha))
        rows.append(row)

    _holm(rows)
    for row in rows:
        if row["decision"] != "baseline":
            row["decision"] = _decide(row, alpha, delta)
    return rows


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
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
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
    return out


# --- per cell ----------------------------------------------------------------------------------------

_NO_COMPARISON = {"delta": None, "delta_ci_low": None, "delta_ci_high": None, "p_value": None, "p_holm": None,
                  "effect_size": None, "p_improve": None, "decision": "undecided"}


def _describe(d: pd.Series | None) -> dict[str, Any]:
    if d is None:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None}
    return {"mean": _num(d["mean"]), "std": _num(d["std"]),
            "median": _num(d["median"]), "min": _num(d["min"]), "max": _num(d["max"])}


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


def _versus(x: np.ndarray, base: np.ndarray, alpha: float) -> dict[str, Any]:
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
    pooled = math.sqrt(((x.size - 1) * v1 + (base.size - 1) * v0) / (x.size + base.size - 2))
    correction = 1 - 3 / (4 * (x.size + base.size) - 9)   # Hedges' small-sample factor J (Hedges & Olkin 1985)
    se = math.sqrt(v1 / x.size + v0 / base.size)
    # Welch–Satterthwaite degrees of freedom
    df = se ** 4 / ((v1 / x.size) ** 2 / (x.size - 1) + (v0 / base.size) ** 2 / (base.size - 1))
    half = float(stats.t.ppf(1 - alpha / 2, df)) * se
    out.update(delta_ci_low=d - half, delta_ci_high=d + half, effect_size=correction * d / pooled,
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
