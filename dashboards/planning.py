"""`ablate plan`: the seeds each comparison needs to decide a difference of D points, and what they cost.

The design is paired by seed, so the power is that of a one-sample t-test on the per-seed differences
(statsmodels' `TTestPower`), with their SD measured on the pairs the grid (or a pilot grid) has finished,
at α/m for the m comparisons of the table: Holm's first step, so the planned power is a floor for Holm's.
`seeds` is that fixed design. `ablate run --until-decided` spreads α over its looks, so to keep the power
its last look needs more: `max_seeds` = seeds × the plan's inflation factor (dashboards.sequential, on the
z scale, for 4 equally spaced looks: the default plan's shape), while it stops early where it can.

Cost: `more_seeds` beyond the pairs already finished, for the variant and for its baseline, times each
cell's mean measured trial time (the attempts' start and end times in the state store, summed over the
attempts of a trial, so a trial that crashed and resumed counts whole). A setting's baseline serves all of
its comparisons: the total counts its seeds once, for the comparison that needs the most.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .sequential import Plan, inflation
from .stats import paired_differences

# `--until-decided` by default: the grid's seeds, then 3 more batches of as many (4 equally spaced looks)
DEFAULT_SHAPE = Plan(looks=(2, 4, 6, 8))


def plan_seeds(results: Any, baseline: str, delta: float, power: float = 0.8, alpha: float = 0.05,
               durations: Iterable[Mapping[str, Any]] = (), metric: str = "test_error") -> dict[str, Any]:
    """Per comparison: pairs so far, SD of the differences, seeds needed (fixed and sequential) and the cost."""
    if not delta > 0:
        raise ValueError(f"--delta must be a positive difference, got {delta}")
    if not 0.5 <= power < 1 or not 0 < alpha < 0.5:
        raise ValueError(f"--power must lie in [0.5, 1) and --alpha in (0, 0.5), got {power} and {alpha}")
    differences = paired_differences(results, baseline, metric)
    m = max(1, len(differences))
    level = alpha / m
    seconds: dict[tuple, list[float]] = defaultdict(list)
    for d in durations:
        seconds[(d["dataset"], d["depth"], d["variant"])].append(d["seconds"])
    cost = {cell: float(np.mean(v)) for cell, v in seconds.items()}
    factor = inflation(DEFAULT_SHAPE, 1 / m, power)
    rows = []
    for (dataset, depth, variant), d in sorted(differences.items(), key=lambda item: item[0]):
        sd = float(np.std(d.to_numpy(), ddof=1)) if d.size > 1 else None
        row: dict[str, Any] = {"setting": {"dataset": dataset, "depth": int(depth)}, "variant": variant,
                               "pairs": int(d.size), "sd_diff": sd, "effect_size": None, "seeds": None,
                               "max_seeds": None, "more_seeds": None,
                               "seconds_per_trial": cost.get((dataset, depth, variant)),
                               "baseline_seconds_per_trial": cost.get((dataset, depth, baseline)), "trial_hours": None,
                               "reason": None}
        if sd is None or sd == 0:
            row["reason"] = "fewer than 2 pairs" if sd is None else "the differences have no spread"
        elif (nobs := _nobs(delta / sd, level, power)) is None:
            row.update(effect_size=delta / sd, reason="no seed count found: the difference is too small for "
                                                      "the spread of the pairs")
        else:
            row["effect_size"] = delta / sd
            row["seeds"] = max(2, math.ceil(nobs))
            row["max_seeds"] = max(2, math.ceil(nobs * factor))
            row["more_seeds"] = max(0, row["seeds"] - row["pairs"])
            if row["seconds_per_trial"] is not None and row["baseline_seconds_per_trial"] is not None:
                row["trial_hours"] = row["more_seeds"] * (row["seconds_per_trial"]
                                                          + row["baseline_seconds_per_trial"]) / 3600
        rows.append(row)
    return {"metric": metric, "baseline": baseline, "delta": delta, "power": power, "alpha": alpha,
            "comparisons": len(differences), "alpha_per_comparison": level, "sequential_inflation": factor,
            "rows": rows, "total_trial_hours": _total_hours(rows)}


def _nobs(effect: float, level: float, power: float) -> float | None:
    """Pairs for the paired t-test's power (statsmodels), or None where its solver finds none."""
    from statsmodels.stats.power import TTestPower
    analysis = TTestPower()
    if analysis.power(effect_size=effect, nobs=2, alpha=level) >= power:
        return 2.0   # two pairs already do (the solver does not converge on differences this large)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # a solver that fails says so by returning nan
        nobs = float(np.asarray(analysis.solve_power(effect_size=effect, alpha=level, power=power)).ravel()[0])
    return nobs if math.isfinite(nobs) else None


def _total_hours(rows: list[dict[str, Any]]) -> float | None:
    """Variants' extra trials plus each setting's baseline once, for its neediest comparison."""
    if any(r["seeds"] is not None and r["trial_hours"] is None for r in rows):
        return None   # a cell without measured trial times: no honest total
    variants = sum(r["more_seeds"] * r["seconds_per_trial"] for r in rows if r["seeds"] is not None)
    baselines: dict[tuple, float] = {}
    for r in rows:
        if r["seeds"] is not None:
            key = tuple(r["setting"].values())
            baselines[key] = max(baselines.get(key, 0.0), r["more_seeds"] * r["baseline_seconds_per_trial"])
    return (variants + sum(baselines.values())) / 3600
