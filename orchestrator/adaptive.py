"""`ablate run GRID --until-decided`: add seeds only where a comparison is still open.

Each look runs the grid (plus the seeds added so far), then tests every still-open comparison (variant
vs baseline in one setting) at that look's share of α (dashboards/sequential.py). A comparison that
reaches `better`, `worse` or `equivalent` stops with that decision; the others get the next batch of
seeds, for the variant and its baseline, until `max_seeds`. The same new seeds go to both arms, so
seeds stay shared across variants.
"""
from __future__ import annotations

from typing import Any

from dashboards.sequential import look_alphas, planned_looks
from dashboards.stats import compare

from .grids import GridSpec, expand_cells
from .scheduler import GridRunner


def run_until_decided(runner: GridRunner, spec: GridSpec, max_seeds: int, batch: int | None = None,
                      alpha: float = 0.05) -> dict[str, Any]:
    seeds = spec.seed_list
    looks = planned_looks(len(seeds), batch or len(seeds), max_seeds)
    alphas = look_alphas(looks, alpha)
    baseline, order = spec.baseline_name, spec.variant_names()
    stopped: dict[tuple, dict[str, Any]] = {}
    extra, history, next_seed = [], [], max(seeds) + 1
    executed, reused = 0, None
    for k, (n_k, a_k) in enumerate(zip(looks, alphas), start=1):
        out = runner.run(spec, extra=extra)
        executed += out["executed"]
        reused = out["reused"] if reused is None else reused
        rows = compare(runner.store.results_table(out["grid"]), baseline=baseline, alpha=a_k, variant_order=order)
        still_open = []
        for row in rows:
            cell = (row["setting"]["dataset"], row["setting"]["depth"], row["variant"])
            if row["decision"] == "baseline" or cell in stopped:
                continue
            if row["decision"] == "undecided":
                still_open.append(cell)
            else:
                stopped[cell] = {"decision": row["decision"], "look": k, "n": row["n"], "alpha": a_k,
                                 "delta": row["delta"], "p_holm": row["p_holm"]}
        history.append({"look": k, "seeds_per_arm": n_k, "alpha": a_k, "stopped": len(stopped),
                        "open": len(still_open)})
        if not still_open or k == len(looks):
            break
        new_seeds = list(range(next_seed, next_seed + looks[k] - n_k))
        next_seed += len(new_seeds)
        cells = set(still_open) | {(d, depth, baseline) for d, depth, _ in still_open}
        extra += expand_cells(spec, cells, new_seeds, tuned=runner.store.tuned_recipes() if spec.tuned_names() else None)
    decisions = [{"dataset": c[0], "depth": c[1], "variant": c[2], **info} for c, info in stopped.items()]
    decisions += [{"dataset": c[0], "depth": c[1], "variant": c[2], "decision": "undecided", "look": len(history),
                   "n": None, "alpha": None, "delta": None, "p_holm": None} for c in still_open]
    return {**out, "executed": executed, "reused": reused, "adaptive": {"max_seeds": max_seeds, "looks": history,
                                                      "decisions": decisions}}
