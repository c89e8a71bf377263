"""Decisions: Ablate's group-sequential procedure against the fixed-n design, by simulation, in the same run.

What it simulates: a table of m comparisons (variants against one shared baseline, m = 4 and 10), seeds
paired as in every Ablate grid. Seed s of every arm shares a seed effect (correlation ρ between the arms
of a pair, `--rho`); a run's result is its arm's mean + √ρ·u_s + √(1−ρ)·ε, σ = 1. The per-seed difference
d = Δ + √(1−ρ)(ε_variant − ε_baseline) is what both designs analyse, paired; the baseline's ε is shared
by the m comparisons, so they are correlated as in a real table. Effects Δ in σ of a run, alternating
in sign (variants better and worse): all 0 (the global null), all 0.5σ, 1σ, 1.5σ, 2σ, and two partial nulls
(half 0, half 1σ or 2σ: the comparisons that are decided early pass their α on to the null ones, the
hardest case for the family-wise error).

- ablate: `dashboards.sequential` itself (`levels` and `decide`, the functions `ablate run --until-decided`
  calls at each look): looks at 3, 6, 9, 12 seeds (`--looks`; a grid of 3 seeds run with the default
  plan), Hwang–Shih–DeCani α spending, Holm as a graphical procedure, paired t at the boundaries' nominal
  levels, the 75% rule, TOST equivalence and non-binding futility against `--margin` (in σ of a run).
- fixed: the fixed-n table of `ablate compare` (paired t, Holm-adjusted p < α and the 75% rule), at the
  plan's maximum, and at every n from 2 to twice it to find the n with Ablate's power.

Reported per setting: family-wise error (any false `better`/`worse` among the comparisons with Δ = 0, or
a difference claimed in the wrong direction), the same for a fresh fixed-α table of the samples the
stopping left behind (`naive`: what `compare` showed after `--until-decided` before the plan was stored), the rate of false `equivalent` claims (|Δ| ≥ margin),
power (a correct `better`/`worse`, averaged over the comparisons with Δ ≠ 0), expected seeds per variant
arm, and expected trials of the whole table (variants plus the baseline, which runs as long as its
longest comparison). ratio = trials the fixed design needs for Ablate's power / Ablate's expected trials,
at the headline setting: m = 4 at 1.5σ, the effect the plan's 12 seeds are sized for (the fixed design's
power there is 0.96; at 1σ the 75% rule caps any design's power near 0.68, at 2σ both designs saturate and
equal power is ill-defined). Every setting's ratio is printed; the last line adds those at 1σ and 2σ and,
under the global null, the fixed design's trials over Ablate's (`null_ratio`: what futility stopping
saves). The spending parameter γ is compared from −4 (O'Brien–Fleming-like) to 1 (Pocock-like) with
`--gammas`; the last line is for the default `dashboards.sequential.SPENDING_GAMMA`.

Monte-Carlo error: with the default 20,000 simulated tables per setting the standard error of a
family-wise error near 0.05 is 0.0015; fwer_max is also printed with its upper 99% bound.

    .venv/bin/python bench/decisions.py                 # about a minute on 2 cores
    .venv/bin/python bench/decisions.py --rho 0.8 --margin 0.5
    .venv/bin/python bench/decisions.py --quick         # seconds, for a smoke run

The last line is `key=value` pairs including `fwer_max=` and `ratio=` (>1: Ablate needs fewer trials).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from dashboards.sequential import (BETTER, EQUIVALENT, OPEN, SPENDING_GAMMA, WORSE, Plan, decide,  # noqa: E402
                                   levels)

# The effect the default plan's 12 seeds are sized for: the fixed design's power there is 0.96 (at 1σ the
# 75% rule caps it near 0.68 whatever the seeds; at 2σ both saturate, and equal power becomes ill-defined).
HEADLINE = (4, "1.5σ")


def settings(m: int) -> dict[str, np.ndarray]:
    signs = np.where(np.arange(m) % 2 == 0, -1.0, 1.0)   # better, worse, better, …
    half = np.arange(m) < m // 2
    return {"null": np.zeros(m), "0.5σ": 0.5 * signs, "1σ": 1.0 * signs, "1.5σ": 1.5 * signs, "2σ": 2.0 * signs,
            "half 0, half 1σ": np.where(half, 0.0, signs), "half 0, half 2σ": np.where(half, 0.0, 2 * signs)}


def differences(effects: np.ndarray, n: int, rho: float, sims: int, rng: np.random.Generator) -> np.ndarray:
    """Per-seed differences (sims, m, n): the seed effect shared by a pair cancels, the baseline's noise is
    shared by the m comparisons."""
    base = rng.standard_normal((sims, 1, n), dtype=np.float32)
    own = rng.standard_normal((sims, effects.size, n), dtype=np.float32)
    return effects[None, :, None] + math.sqrt(1 - rho) * (own - base)


def running(d: np.ndarray):
    """n ↦ (mean, SD, share of seeds where the variant is lower) over the first n seeds; n a count, or one
    count per comparison (an array shaped like the comparisons)."""
    total, squares, lower = (np.cumsum(x, axis=-1, dtype=np.float64) for x in (d, d * d, d < 0))

    def at(n):
        if np.ndim(n):
            index = np.asarray(n)[..., None] - 1
            sums = [np.take_along_axis(x, index, axis=-1)[..., 0] for x in (total, squares, lower)]
        else:
            sums = [x[..., n - 1] for x in (total, squares, lower)]
        mean = sums[0] / n
        var = np.maximum(sums[1] - n * mean * mean, 0.0) / (np.asarray(n) - 1)
        return mean, np.sqrt(var), sums[2] / n
    return at


def ablate(stats_at, shape: tuple[int, int], plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The sequential procedure on every simulated table: outcome codes and seeds used per comparison."""
    sims, m = shape
    open_ = np.ones((sims, m), bool)
    rejected = np.zeros((sims, m), bool)
    outcome = np.full((sims, m), OPEN)
    used = np.full((sims, m), plan.looks[-1])
    for k, n in enumerate(plan.looks):
        efficacy, equivalence, futility = levels(plan, plan.looks[:k + 1], m)
        mean, sd, improve = stats_at(n)
        out, _ = decide(np.full((sims, m), n), mean, sd, improve, open_, rejected,
                        np.broadcast_to(efficacy, (sims, m, m)), np.broadcast_to(equivalence, (sims, m, m)),
                        np.full((sims, m), futility), plan.margin)
        stop = open_ & (out != OPEN)
        outcome = np.where(stop, out, outcome)
        used = np.where(stop, n, used)
        rejected |= (out == BETTER) | (out == WORSE)
        open_ &= ~stop
    return outcome, used


def fixed(stats_at, n, alpha: float) -> np.ndarray:
    """`ablate compare` at n seeds (or n per comparison): paired t, Holm-adjusted p < α, the 75% rule."""
    mean, sd, improve = stats_at(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.nan_to_num(2 * stats.t.sf(np.abs(mean) / (sd / np.sqrt(n)), np.asarray(n) - 1), nan=1.0)
    m = p.shape[-1]
    order = np.argsort(p, axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1) * np.arange(m, 0, -1)
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, np.minimum(1.0, np.maximum.accumulate(ranked, axis=-1)), axis=-1)
    significant = adjusted < alpha
    return np.where(significant & (mean < 0) & (improve > 0.75), BETTER,
                    np.where(significant & (mean > 0) & (improve < 0.25), WORSE, OPEN))


def score(outcome: np.ndarray, effects: np.ndarray, margin: float) -> dict[str, float]:
    null, real = effects == 0, effects != 0
    right = np.where(effects < 0, BETTER, WORSE)
    wrong = ((outcome == BETTER) | (outcome == WORSE)) & (null | (real & (outcome != right)))
    far = np.abs(effects) >= margin
    return {"fwer": float(wrong.any(axis=-1).mean()),
            "false_eq": float((outcome == EQUIVALENT)[:, far].mean()) if far.any() else float("nan"),
            "power": float((outcome == right)[:, real].mean()) if real.any() else float("nan")}


def equal_power_n(powers: dict[int, float], target: float) -> float:
    """The fixed design's seeds for `target` power, interpolated between whole seed counts."""
    ns = sorted(powers)
    for a, b in zip(ns, ns[1:]):
        if powers[b] >= target:
            if powers[a] >= target:
                return float(a)
            return a + (target - powers[a]) / (powers[b] - powers[a])
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sims", type=int, default=20_000)
    parser.add_argument("--rho", type=float, default=0.5, help="correlation between the arms of a pair")
    parser.add_argument("--margin", type=float, default=1.0, help="equivalence and futility margin, in σ of a run")
    parser.add_argument("--looks", default="3,6,9,12")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--gammas", default="-4,-2,-1,0,1", help="α-spending γ values to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2,000 tables per setting")
    args = parser.parse_args()
    sims = 2000 if args.quick else args.sims
    looks = tuple(int(x) for x in args.looks.split(","))
    gammas = sorted({float(g) for g in args.gammas.split(",")} | {SPENDING_GAMMA})
    wall = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    n_max = looks[-1]
    print(f"{sims} simulated tables per setting; ρ = {args.rho}, margin = {args.margin}σ, looks at {list(looks)}, "
          f"α = {args.alpha}; SE of an error rate near α: {math.sqrt(args.alpha * (1 - args.alpha) / sims):.4f}")
    results: dict[tuple, dict] = {}
    for m in (4, 10):
        for name, effects in settings(m).items():
            stats_at = running(differences(effects, 2 * n_max, args.rho, sims, rng))
            fixed_power = {n: score(fixed(stats_at, n, args.alpha), effects, args.margin)["power"]
                           for n in range(2, 2 * n_max + 1)} if effects.any() else {}
            fixed_at_max = score(fixed(stats_at, n_max, args.alpha), effects, args.margin)
            for gamma in gammas:
                plan = Plan(looks=looks, alpha=args.alpha, margin=args.margin, gamma=gamma)
                outcome, used = ablate(stats_at, (sims, effects.size), plan)
                got = score(outcome, effects, args.margin)
                trials = used.sum(axis=-1) + used.max(axis=-1)   # variants, and the baseline for the longest
                n_star = equal_power_n(fixed_power, got["power"]) if effects.any() else float("nan")
                # what the old tables did: a fresh fixed-α table of the samples the stopping left behind
                naive = score(fixed(stats_at, used, args.alpha), effects, args.margin)["fwer"]
                results[(m, name, gamma)] = {
                    **got, "naive_fwer": naive, "seeds": float(used.mean()), "trials": float(trials.mean()),
                    "early": float((used < n_max).mean()), "fixed": fixed_at_max,
                    "fixed_trials_equal_power": (m + 1) * n_star, "ratio": (m + 1) * n_star / float(trials.mean())}
    header = (f"{'m':>3} {'setting':<16} {'γ':>5} {'FWER':>7} {'naive':>7} {'falseEq':>8} {'power':>6} "
              f"{'seeds':>6} {'early':>6} {'trials':>7} | {'fixed FWER':>10} {'power':>6} {'trials':>6} {'n*':>6} "
              f"{'ratio':>6}")
    print(header)
    for (m, name, gamma), r in results.items():
        n_star = r["fixed_trials_equal_power"] / (m + 1)
        print(f"{m:>3} {name:<16} {gamma:>5g} {r['fwer']:>7.4f} {r['naive_fwer']:>7.4f} {r['false_eq']:>8.4f} "
              f"{r['power']:>6.3f} "
              f"{r['seeds']:>6.2f} {r['early']:>6.2f} {r['trials']:>7.1f} | {r['fixed']['fwer']:>10.4f} "
              f"{r['fixed']['power']:>6.3f} {(m + 1) * n_max:>6} {n_star:>6.2f} {r['ratio']:>6.2f}")
    print("\nper γ: highest family-wise error over the null settings (both m); power, trials and ratio at 1σ")
    null_names = ("null", "half 0, half 1σ", "half 0, half 2σ")
    for gamma in gammas:
        worst = max(results[(m, n, gamma)]["fwer"] for m in (4, 10) for n in null_names)
        at = [results[(m, "1σ", gamma)] for m in (4, 10)]
        print(f"  γ {gamma:>4g}: fwer_max {worst:.4f}; 1σ power {at[0]['power']:.3f} / {at[1]['power']:.3f}, "
              f"trials {at[0]['trials']:.1f} / {at[1]['trials']:.1f}, ratio {at[0]['ratio']:.2f} / {at[1]['ratio']:.2f}"
              f" (m = 4 / 10)")
    chosen = {k: v for k, v in results.items() if k[2] == SPENDING_GAMMA}
    fwer_max = max(v["fwer"] for (m, name, _), v in chosen.items() if name in null_names)
    bound = fwer_max + 2.576 * math.sqrt(fwer_max * (1 - fwer_max) / sims)
    fixed_fwer = max(v["fixed"]["fwer"] for (m, name, _), v in chosen.items() if name in null_names)
    naive_fwer = max(v["naive_fwer"] for (m, name, _), v in chosen.items() if name in null_names)
    feq_max = max(v["false_eq"] for v in chosen.values() if not math.isnan(v["false_eq"]))
    head = chosen[(*HEADLINE, SPENDING_GAMMA)]
    null = chosen[(HEADLINE[0], "null", SPENDING_GAMMA)]
    print(f"\ndefault γ = {SPENDING_GAMMA:g}: fwer_max {fwer_max:.4f} (99% upper bound {bound:.4f}; "
          f"α = {args.alpha}); "
          f"wall {time.perf_counter() - wall:.0f} s")
    print(f"bench=decisions sims={sims} rho={args.rho} margin={args.margin} looks={'/'.join(map(str, looks))} "
          f"gamma={SPENDING_GAMMA:g} fwer_max={fwer_max:.4f} fwer_max_upper99={bound:.4f} "
          f"fixed_fwer_max={fixed_fwer:.4f} naive_fwer_max={naive_fwer:.4f} "
          f"false_eq_max={feq_max:.4f} power={head['power']:.3f} fixed_power={head['fixed']['power']:.3f} "
          f"trials={head['trials']:.1f} fixed_trials={head['fixed_trials_equal_power']:.1f} "
          f"ratio_1sigma={chosen[(HEADLINE[0], '1σ', SPENDING_GAMMA)]['ratio']:.2f} "
          f"ratio_2sigma={chosen[(HEADLINE[0], '2σ', SPENDING_GAMMA)]['ratio']:.2f} "
          f"null_ratio={(HEADLINE[0] + 1) * n_max / null['trials']:.2f} "
          f"wall_s={time.perf_counter() - wall:.0f} ratio={head['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
