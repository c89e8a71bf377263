"""Group-sequential error control for adding seeds until the comparisons are decided.

Looking at a growing sample again and again with a fixed α inflates false discoveries. Instead, the
family-wise α is spent over the planned looks with an O'Brien–Fleming-type spending function (Lan &
DeMets 1983): α(t) = 2 − 2Φ(z_{1−α/2} / √t) at information fraction t = n_k / n_max. Look k tests at the
increment α_k = α(t_k) − α(t_{k−1}), with Holm across the table's comparisons at that level. By the union
bound over looks and Holm within each look, the probability of any false `better`/`worse` over the whole
procedure is at most α, whatever the dependence between looks (conservative: it ignores that dependence,
which the exact group-sequential boundaries of AdaStop-style procedures exploit). Early looks spend very
little α, so only large effects stop early; a comparison that stops keeps the decision it stopped with.
"""
from __future__ import annotations

import math

from scipy.stats import norm


def obrien_fleming_spent(t: float, alpha: float) -> float:
    """Cumulative α spent by information fraction t ∈ (0, 1]."""
    if t <= 0:
        return 0.0
    return float(2.0 - 2.0 * norm.cdf(norm.ppf(1.0 - alpha / 2.0) / math.sqrt(min(t, 1.0))))


def look_alphas(sample_sizes: list[int], alpha: float) -> list[float]:
    """Per-look test levels for looks at these per-arm sample sizes (the last one is n_max)."""
    if not sample_sizes or sorted(set(sample_sizes)) != list(sample_sizes):
        raise ValueError(f"look sample sizes must be strictly increasing, got {sample_sizes}")
    n_max = sample_sizes[-1]
    spent = [obrien_fleming_spent(n / n_max, alpha) for n in sample_sizes]
    return [b - a for a, b in zip([0.0, *spent[:-1]], spent)]


def planned_looks(start: int, batch: int, max_seeds: int) -> list[int]:
    """Per-arm seed counts at each look: start, start+batch, …, max_seeds."""
    if start < 2:
        raise ValueError("sequential testing needs at least 2 seeds per variant at the first look")
    if batch < 1 or max_seeds < start:
        raise ValueError(f"need batch ≥ 1 and max_seeds ≥ the grid's seeds ({start}), got {batch} and {max_seeds}")
    looks = list(range(start, max_seeds, batch))
    return [*looks, max_seeds] if not looks or looks[-1] != max_seeds else looks
