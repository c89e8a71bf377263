"""Group-sequential decisions: when `ablate run --until-decided` stops adding seeds to a comparison.

The design is paired by seed, as every Ablate grid is: comparison i (a variant against its baseline in
one setting) is the mean of the per-seed differences d = variant − baseline. At look k it has n_k pairs of
a planned maximum N, information fraction t_k = n_k / N. Three rules, each a group-sequential test:

- efficacy, H0: Δ = 0, two-sided → `better` / `worse` (and, as in a fixed table, only when the variant
  beats its baseline on more than 75% of the seeds, in the direction of Δ). Error spent with the
  Hwang–Shih–DeCani family α(t) = α (1 − e^{−γt}) / (1 − e^{−γ}) (Hwang, Shih & DeCani 1990).
- equivalence, H0: |Δ| ≥ margin, two one-sided tests (TOST) → `equivalent`; the same α spending, one-sided.
- futility, non-binding: the comparison stops with `undecided` once a difference of `margin` is itself
  rejected at a β-spending level, so P(stopping for futility | |Δ| = margin) ≤ β. The efficacy boundaries
  ignore it (non-binding), so stopping for futility never raises the error rate.

Across the comparisons of a table: Holm, as a graphical procedure (Maurer & Bretz 2013, "Multiple testing
in group sequential trials using graphical approaches"): a comparison is tested at α/j, j the comparisons
not yet shown different; a rejection passes its share to the others, whose boundaries are then those of
the larger level at every look. An equivalence claim or a futility stop passes nothing on.

Boundaries are on the z scale, computed for the information each comparison actually has (Lan & DeMets
1983: a crashed run or a smaller last batch changes the boundary, not the error rate) by numerical
integration over the looks (Armitage, McPherson & Rowe 1969; Jennison & Turnbull 2000, ch. 19). Each
look's paired t-statistic is tested at its z boundary's nominal p-value (the significance-level approach,
Jennison & Turnbull §3.8). bench/decisions.py checks the whole procedure (t statistics with 2 degrees of
freedom at a first look of 3 seeds included) by simulation. Written here rather than taken from a
package: the Python group-sequential packages are young one-author projects, and the recursion is short.

Why γ = −1 for α: O'Brien–Fleming-type spending (γ ≈ −4) spends under 3e-3 of α = 0.05 at 3 seeds of 12
(the classic O'Brien–Fleming function under 1e-4), so almost nothing stops early. bench/decisions.py
(20,000 simulated tables per setting, looks at 3/6/9/12 seeds, ρ = 0.5) compared γ = −4, −2, −1, 0, 1:
every one kept the family-wise error below α (worst 0.037 for γ = −1, 0.045 for γ = 1). At the effect 12
seeds are sized for (1.5σ, m = 4) γ = −1 and 0 reached the fixed design's power with the fewest trials
(ratio 1.10); at 2σ γ = 1 stopped soonest (1.32 against 1.25 for γ = −1); at 1σ γ = −4 and −2 lost the
least power (0.636 and 0.634 against 0.625 for γ = −1, 0.573 for γ = 1). γ = −1 is within a few percent
of the best everywhere; it spends 17% of α by a quarter of the seeds (Pocock-like γ = 1: 35%, where a
paired t with 2 degrees of freedom can rarely use it). β = 0.2 with γ = −2 for futility stops a
comparison with no effect after 8 of 12 seeds on average (margin 1σ) at a power cost of about 0.04 at 1σ.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, stats

# Hwang–Shih–DeCani γ for α (efficacy and equivalence) and for β (futility), chosen with bench/decisions.py.
SPENDING_GAMMA = -1.0
FUTILITY_GAMMA = -2.0
DEFAULT_BETA = 0.2
IMPROVE_THRESHOLD = 0.75   # the fixed table's rule (dashboards/stats.py): beats the baseline on > 75% of seeds

OPEN, BETTER, WORSE, EQUIVALENT, FUTILE = 0, 1, 2, 3, 4
OUTCOMES = {BETTER: "better", WORSE: "worse", EQUIVALENT: "equivalent", FUTILE: "undecided"}
STOPPED = {BETTER: "efficacy", WORSE: "efficacy", EQUIVALENT: "equivalence", FUTILE: "futility"}


@dataclass(frozen=True)
class Plan:
    """Everything the decisions depend on, fixed before the first look and stored with the grid."""

    looks: tuple[int, ...]      # pairs (seeds per arm) at each look; the last is the cap
    alpha: float = 0.05         # family-wise, over every look and comparison
    margin: float = 0.2         # smallest difference that matters, in the metric's units
    beta: float = DEFAULT_BETA  # futility: chance of stopping when |Δ| = margin
    gamma: float = SPENDING_GAMMA
    futility_gamma: float = FUTILITY_GAMMA
    baseline: str = ""
    metric: str = "test_error"
    seeds: tuple[int, ...] = field(default=())   # the seed of each pair, in the order they are added

    def __post_init__(self):
        if len(self.looks) < 1 or self.looks[0] < 2 or any(b <= a for a, b in zip(self.looks, self.looks[1:])):
            raise ValueError(f"looks must be increasing seed counts from 2 on, got {list(self.looks)}")
        if not 0 < self.alpha < 1 or not 0 < self.beta < 1:
            raise ValueError(f"alpha and beta must lie in (0, 1), got {self.alpha} and {self.beta}")
        if not self.margin > 0:
            raise ValueError(f"the equivalence margin must be positive, got {self.margin}")
        if self.seeds and len(self.seeds) != self.looks[-1]:
            raise ValueError(f"a plan of {self.looks[-1]} seeds lists {len(self.seeds)}")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "looks": list(self.looks), "seeds": list(self.seeds)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return cls(**{**data, "looks": tuple(data["looks"]), "seeds": tuple(data.get("seeds", ()))})


def planned_looks(start: int, batch: int, max_seeds: int) -> list[int]:
    """Seeds per arm at each look: start, start+batch, …, max_seeds."""
    if start < 2:
        raise ValueError("sequential testing needs at least 2 seeds per variant at the first look")
    if batch < 1 or max_seeds < start:
        raise ValueError(f"need batch ≥ 1 and max_seeds ≥ the grid's seeds ({start}), got {batch} and {max_seeds}")
    looks = list(range(start, max_seeds, batch))
    return [*looks, max_seeds] if not looks or looks[-1] != max_seeds else looks


def spent(t: np.ndarray | float, total: float, gamma: float) -> np.ndarray:
    """Hwang–Shih–DeCani: error spent by information fraction t ∈ [0, 1] (γ = 0: linear)."""
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    if gamma == 0:
        return total * t
    return total * np.expm1(-gamma * t) / np.expm1(-gamma)


# --- boundaries --------------------------------------------------------------------------------------

_TAIL = 8.0   # the integration grid reaches 8 standard deviations out: the mass beyond is below 1e-15


def _walk(fractions: tuple[float, ...], two_sided: bool, drift: float, pick) -> tuple[list[float], float]:
    """Carry the density of S_k = √t_k Z_k (a Brownian motion with `drift` per unit information, started at 0)
    over the continuation regions, look by look, on a Simpson grid fine enough for the smallest increment.
    `pick(k, crossing)` gives look k's bound from crossing(c) = P(first crossing at look k, bound c).
    Returns the bounds and the total crossing probability."""
    t = np.asarray(fractions, dtype=float)
    steps = np.diff(np.concatenate(([0.0], t)))
    if t.size == 0 or t[0] <= 0 or np.any(steps <= 0):
        raise ValueError(f"information fractions must increase from above 0, got {list(fractions)}")
    points = int(min(2001, max(201, 2 * _TAIL * 6 / math.sqrt(steps.min())))) | 1
    grid, weights, density = np.zeros(1), np.ones(1), np.ones(1)   # S_0 = 0: a point mass
    bounds, total = [], 0.0
    for k, (tk, dt) in enumerate(zip(t, steps)):
        root, sd, shift = math.sqrt(tk), math.sqrt(dt), drift * dt

        def crossing(c: float) -> float:
            upper = stats.norm.sf((c * root - grid - shift) / sd)
            lower = stats.norm.cdf((-c * root - grid - shift) / sd) if two_sided else 0.0
            return float(np.sum(weights * density * (upper + lower)))

        c = pick(k, crossing)
        bounds.append(c)
        total += crossing(c)
        reach = (_TAIL + abs(drift)) * root
        high = min(c * root, reach)
        new_grid = np.linspace(-high if two_sided else -reach, high, points)
        h = new_grid[1] - new_grid[0]
        kernel = stats.norm.pdf((new_grid[:, None] - grid[None, :] - shift) / sd) / sd
        density = kernel @ (weights * density)
        grid, weights = new_grid, np.where(np.arange(points) % 2 == 1, 4 * h / 3, 2 * h / 3)
        weights[[0, -1]] = h / 3
    return bounds, total


@functools.lru_cache(maxsize=4096)
def z_boundaries(fractions: tuple[float, ...], spending: tuple[float, ...], two_sided: bool) -> tuple[float, ...]:
    """c_k such that under H0 the first crossing happens at look k with probability spending_k − spending_{k−1}
    (crossing: |Z_k| ≥ c_k two-sided, Z_k ≥ c_k one-sided); inf where nothing is spent."""
    increments = np.diff(np.concatenate(([0.0], spending)))

    def pick(k, crossing):
        if increments[k] <= 0:
            return math.inf
        return optimize.brentq(lambda c: crossing(c) - increments[k], 0.0, 40.0, xtol=1e-10)

    return tuple(_walk(fractions, two_sided, 0.0, pick)[0])


def crossing_power(fractions: tuple[float, ...], bounds: tuple[float, ...], drift: float) -> float:
    """P(|Z_k| ≥ c_k at some look) when Z's mean at full information is `drift` (two-sided bounds)."""
    return _walk(fractions, True, drift, lambda k, crossing: bounds[k])[1]


def inflation(plan: Plan, share: float, power: float) -> float:
    """How many times the fixed design's seeds the plan needs at its last look for the same power (z scale)."""
    fractions = tuple(n / plan.looks[-1] for n in plan.looks)
    level = plan.alpha * share
    bounds = z_boundaries(fractions, tuple(spent(fractions, level, plan.gamma)), True)
    fixed = stats.norm.isf(level / 2) + stats.norm.ppf(power)
    drift = optimize.brentq(lambda d: crossing_power(fractions, bounds, d) - power, 0.0, 3 * fixed + 10)
    return (drift / fixed) ** 2


def levels(plan: Plan, history: tuple[int, ...], m: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Nominal levels at the last of `history` (a comparison's pair counts at the looks where it was tested,
    increasing): two-sided efficacy and one-sided equivalence p-value thresholds when j = 1 … m comparisons
    hold the α (index j − 1), and the one-sided futility threshold."""
    fractions = tuple(min(n / plan.looks[-1], 1.0) for n in history)
    efficacy, equivalence = np.empty(m), np.empty(m)
    for j in range(1, m + 1):
        spending = tuple(spent(fractions, plan.alpha / j, plan.gamma))
        efficacy[j - 1] = 2 * stats.norm.sf(z_boundaries(fractions, spending, True)[-1])
        equivalence[j - 1] = stats.norm.sf(z_boundaries(fractions, spending, False)[-1])
    futility = stats.norm.sf(z_boundaries(fractions, tuple(spent(fractions, plan.beta, plan.futility_gamma)),
                                          False)[-1])
    return efficacy, equivalence, float(futility)


# --- one look ----------------------------------------------------------------------------------------

def paired_p(n: np.ndarray, mean: np.ndarray, sd: np.ndarray, margin: float) -> tuple[np.ndarray, ...]:
    """Paired t p-values: two-sided for Δ = 0, one-sided against Δ ≤ −margin and against Δ ≥ margin.
    Untestable (n < 2) gives 1; zero spread gives the exact answer (0 or 1)."""
    n = np.asarray(n, dtype=float)
    df = np.maximum(n - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.asarray(sd) / np.sqrt(n)
        two = 2 * stats.t.sf(np.abs(mean) / se, df)
        low = stats.t.sf((mean + margin) / se, df)     # small when Δ is clearly above −margin
        high = stats.t.cdf((mean - margin) / se, df)   # small when Δ is clearly below +margin
    ok = n >= 2
    return tuple(np.where(ok, np.nan_to_num(p, nan=1.0), 1.0) for p in (two, low, high))


def decide(n, mean, sd, improve, open_, rejected, efficacy, equivalence, futility, margin):
    """One look for a family of comparisons (the last axis; leading axes are independent families).

    `efficacy[..., i, j − 1]` / `equivalence[..., i, j − 1]`: comparison i's thresholds when j comparisons
    hold α; `futility[..., i]`. `open_`: still adding seeds (and given new pairs); `rejected`: shown
    different at an earlier look. Returns the outcome codes (OPEN where the comparison goes on) and, per
    comparison, the j it was tested with last (its share of α is 1/j)."""
    m = open_.shape[-1]
    n, mean = np.asarray(n), np.asarray(mean)
    p, p_low, p_high = paired_p(n, mean, sd, margin)
    testable = open_ & (n >= 2)
    better = (mean < 0) & (improve > IMPROVE_THRESHOLD)
    worse = (mean > 0) & (improve < 1 - IMPROVE_THRESHOLD)

    def holding(out):
        return np.broadcast_to(m - out.sum(axis=-1, keepdims=True), open_.shape)

    def level(table, j):
        return np.take_along_axis(table, np.maximum(j, 1)[..., None] - 1, axis=-1)[..., 0]

    out = rejected.copy()
    share = holding(out).copy()
    while True:   # Holm's step-down within the look: each rejection raises the others' level
        j = holding(out)
        hit = testable & ~out & (p <= level(efficacy, j)) & (better | worse)
        if not hit.any():
            break
        share = np.where(hit, j, share)
        out |= hit
    newly = out & ~rejected
    j = holding(out)
    share = np.where(newly, share, j)
    tost = np.maximum(p_low, p_high)
    rest = testable & ~newly
    outcome = np.where(newly, np.where(better, BETTER, WORSE), OPEN)
    outcome = np.where(rest & (tost <= level(equivalence, j)), EQUIVALENT, outcome)
    outcome = np.where(rest & (outcome == OPEN) & (tost <= futility), FUTILE, outcome)
    return outcome, share


def look(plan: Plan, number: int, state: dict[Any, dict[str, Any]],
         sample: dict[Any, tuple[int, float, float, float]]) -> dict[Any, dict[str, Any]]:
    """Look `number` (1-based) of a plan for one table.

    `state` (from `replay`): every comparison of the table → {history: its pair counts at the looks it was
    tested, open, rejected}; `sample`: each open comparison → (pairs, mean difference, SD of the differences,
    share of seeds where the variant is lower). Returns, for every open comparison, the record to store:
    n, delta, sd, p_value (paired t, two-sided), level (the nominal threshold it was tested at), share (1/j),
    alpha_spent (α/j spent by its information fraction), ci_low/ci_high (the repeated confidence interval at
    that threshold), decision, stopped (efficacy, equivalence, futility, max_seeds, or None: goes on)."""
    keys = list(state)
    m = len(keys)
    last = number == len(plan.looks)
    fresh = [k for k in keys if state[k]["open"] and sample.get(k, (0,))[0] >= 2
             and sample[k][0] > max(state[k]["history"], default=0)]
    tables = {k: levels(plan, (*state[k]["history"], sample[k][0]), m) for k in fresh}
    efficacy = np.array([tables[k][0] if k in tables else np.zeros(m) for k in keys])
    equivalence = np.array([tables[k][1] if k in tables else np.zeros(m) for k in keys])
    futility = np.array([tables[k][2] if k in tables else 0.0 for k in keys])
    n, mean, sd, improve = (np.array([sample[k][i] if k in tables else 0 for k in keys], dtype=float)
                            for i in range(4))
    outcome, share = decide(n, mean, sd, improve, np.array([k in tables for k in keys]),
                            np.array([bool(state[k]["rejected"]) for k in keys]), efficacy, equivalence,
                            futility, plan.margin)
    p = paired_p(n, mean, sd, plan.margin)[0]
    out: dict[Any, dict[str, Any]] = {}
    for i, key in enumerate(keys):
        if not state[key]["open"]:
            continue
        if key not in tables:   # no new pairs: nothing tested, nothing spent
            out[key] = {"n": int(sample.get(key, (0,))[0]), "delta": None, "sd": None, "p_value": None,
                        "level": None, "share": None, "alpha_spent": None, "ci_low": None, "ci_high": None,
                        "decision": "undecided", "stopped": "max_seeds" if last else None}
            continue
        j = int(share[i])
        level = float(efficacy[i, j - 1])
        half = float(stats.t.isf(level / 2, n[i] - 1) * sd[i] / math.sqrt(n[i]))
        code = int(outcome[i])
        out[key] = {"n": int(n[i]), "delta": float(mean[i]), "sd": float(sd[i]), "p_value": float(p[i]),
                    "level": level, "share": 1 / j,
                    "alpha_spent": float(spent(n[i] / plan.looks[-1], plan.alpha / j, plan.gamma)),
                    "ci_low": float(mean[i] - half), "ci_high": float(mean[i] + half),
                    "decision": OUTCOMES.get(code, "undecided"),
                    "stopped": STOPPED.get(code, "max_seeds" if last else None)}
    return out


def replay(keys: list[Any], looks: list[dict[Any, dict[str, Any]]]) -> dict[Any, dict[str, Any]]:
    """The state after the stored looks (each: comparison → its record), for `look` to go on from."""
    state = {k: {"history": (), "open": True, "rejected": False, "record": None} for k in keys}
    for records in looks:
        for key, record in records.items():
            entry = state[key]
            if record["p_value"] is not None:
                entry["history"] = (*entry["history"], record["n"])
            entry["open"] = record["stopped"] is None
            entry["rejected"] = record["decision"] in ("better", "worse")
            entry["record"] = record
    return state


def sample(differences: "dict[Any, Any]") -> dict[Any, tuple[int, float, float, float]]:
    """A look's input from each comparison's per-seed differences: (pairs, mean, SD, share where lower)."""
    out = {}
    for key, d in differences.items():
        d = np.asarray(d, dtype=float)
        if d.size:
            out[key] = (int(d.size), float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else 0.0,
                        float(((d < 0).sum() + 0.5 * (d == 0).sum()) / d.size))
    return out


def latest(key: Any, looks: list[dict[Any, dict[str, Any]]]) -> tuple[int, dict | None, dict | None]:
    """A comparison's last look number, its record there, and its record at the last look that tested it."""
    seen = [(k, records[key]) for k, records in enumerate(looks, start=1) if key in records]
    tested = [r for _, r in seen if r["p_value"] is not None]
    number, last = seen[-1] if seen else (0, None)
    return number, last, tested[-1] if tested else None


def overlay(rows: list[dict[str, Any]], plan: dict[str, Any], looks: list[dict[Any, dict[str, Any]]]) -> None:
    """Put the plan's decisions into comparison rows (from `dashboards.stats.compare`), in place.

    A comparison's `decision` becomes the one its last look gave; `delta`, `p_value` and the Δ CI are those of
    the last look that tested it (the CI a repeated confidence interval at that look's nominal level, so it
    agrees with the decision); `p_holm` is None (Holm is inside the plan's levels); `sequential` holds
    {look, looks, pairs, alpha_spent, level, share, n_at_stop, stopped}. Before the first look every
    comparison is `undecided` with look 0."""
    for row in rows:
        if row["decision"] == "baseline":
            continue
        number, last, tested = latest((row["setting"]["dataset"], row["setting"]["depth"], row["variant"]), looks)
        row.update(decision=last["decision"] if last else "undecided", p_holm=None,
                   **{field: tested[source] if tested else None
                      for field, source in (("delta", "delta"), ("p_value", "p_value"), ("delta_ci_low", "ci_low"),
                                            ("delta_ci_high", "ci_high"))})
        row["sequential"] = {"look": number, "looks": len(plan["looks"]), "pairs": last["n"] if last else 0,
                             **{k: tested[k] if tested else None for k in ("alpha_spent", "level", "share")},
                             "n_at_stop": last["n"] if last and last["stopped"] else None,
                             "stopped": last["stopped"] if last else None}
