"""`ablate run GRID --until-decided`: add seeds only where a comparison is still open, by a stored plan.

The plan (dashboards.sequential.Plan: looks, seeds, α, β, margin, spending) is stored with the grid before
the first look, and each look's outcome for every comparison once it is made (orchestrator/state.py). A
look runs the grid plus the seeds added so far, then tests every open comparison (variant vs baseline in
one setting, paired by seed); a comparison that reaches `better`, `worse`, `equivalent` or a futility stop
gets no more seeds, the others get the next batch, for the variant and its baseline (so seeds stay shared)
until the plan's cap. Rerunning the same command goes on from the stored looks: a stored look is never
tested again, so no α is spent twice on the same seeds; asking for a different plan then is an error.
"""
from __future__ import annotations

import sys
from typing import Any

from ablations.vocabulary import first_line
from dashboards.sequential import Plan, latest, look, planned_looks, replay, sample
from dashboards.stats import paired_differences

from .grids import GridSpec, expand_cells
from .scheduler import GridRunner

DEFAULT_MARGIN = 0.2   # points of test error: the smallest difference the plan must tell from none


class PlanError(ValueError):
    """The sequential plan asked for is invalid, or contradicts the one stored with the grid (bad input)."""


def plan_for(spec: GridSpec, max_seeds: int | None = None, batch: int | None = None,
             margin: float | None = None) -> Plan:
    """The plan these options ask for: looks every `batch` seeds (default: the grid's seed count) up to
    `max_seeds` (default 4× the grid's), new seeds numbered on from the grid's largest."""
    start = spec.seed_list
    looks = planned_looks(len(start), batch or len(start), max_seeds or 4 * len(start))
    seeds = [*start, *range(max(start) + 1, max(start) + 1 + looks[-1] - len(start))]
    return Plan(looks=tuple(looks), margin=DEFAULT_MARGIN if margin is None else margin,
                baseline=spec.baseline_name, metric="test_error", seeds=tuple(seeds))


def comparisons(spec: GridSpec) -> list[tuple[str, int, str]]:
    return [(d, depth, v) for d in spec.datasets for depth in spec.depths for v in spec.variant_names()
            if v != spec.baseline_name]


def run_until_decided(runner: GridRunner, spec: GridSpec, max_seeds: int | None = None, batch: int | None = None,
                      margin: float | None = None) -> dict[str, Any]:
    store = runner.store
    grid_id = runner.submit(spec)
    stored = store.sequential_plan(grid_id)
    try:  # what the user asked for is checked here, apart: a ValueError from a run is not bad input
        requested = plan_for(spec, max_seeds, batch, margin) if stored is None else None
        if stored is not None:
            _check_same(spec, Plan.from_dict(stored), max_seeds, batch, margin)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    plan = Plan.from_dict(stored if stored is not None else store.start_sequential(grid_id, requested.as_dict()))
    keys = comparisons(spec)
    tuned = store.tuned_recipes() if spec.tuned_names() else None
    done = store.sequential_looks(grid_id)
    extra, looks, out, executed, reused = [], [], None, 0, None
    for k, n_k in enumerate(plan.looks, start=1):
        state = replay(keys, looks)
        still_open = [key for key in keys if state[key]["open"]]
        if not still_open:
            break
        if k > 1:   # the next batch of seeds, for the open comparisons and their baselines
            cells = set(still_open) | {(d, depth, plan.baseline) for d, depth, _ in still_open}
            extra += expand_cells(spec, cells, list(plan.seeds[plan.looks[k - 2]:n_k]), tuned=tuned)
        if k <= len(done):
            looks.append(done[k - 1])   # decided by an earlier run: never tested again
            continue
        out = runner.run(spec, extra=extra)
        executed += out["executed"]
        reused = out["reused"] if reused is None else reused
        differences = paired_differences(store.results_table(grid_id), plan.baseline, plan.metric,
                                         seeds=plan.seeds[:n_k])
        records = look(plan, k, state, sample({key: differences[key] for key in still_open if key in differences}))
        if not store.record_look(grid_id, k, records):
            records = store.sequential_looks(grid_id)[k - 1]   # another driver recorded this look first
        looks.append(records)
        _tag_decisions(runner, grid_id, keys, plan, looks)
    if out is None:   # every look was stored already: finish whatever the grid still owes (retried errors)
        out = runner.run(spec, extra=extra)
        executed, reused = out["executed"], out["reused"]
        _tag_decisions(runner, grid_id, keys, plan, looks)
    return {**out, "executed": executed, "reused": reused, "adaptive": _summary(keys, plan, looks)}


def _check_same(spec: GridSpec, plan: Plan, max_seeds: int | None, batch: int | None, margin: float | None) -> None:
    """A rerun continues the stored plan; asking for another one would spend α again on the same seeds."""
    stored_batch = plan.looks[1] - plan.looks[0] if len(plan.looks) > 1 else None
    asked = plan_for(spec, max_seeds or plan.looks[-1], batch or stored_batch,
                     plan.margin if margin is None else margin)
    if (asked.looks, asked.margin, asked.baseline) != (plan.looks, plan.margin, plan.baseline):
        raise ValueError(f"grid {spec.name} already runs under a sequential plan (looks at {list(plan.looks)} seeds, "
                         f"margin ±{plan.margin:g}, baseline {plan.baseline}); rerun it without --max-seeds, --batch "
                         f"and --margin, and with its baseline, to continue it")


def _summary(keys: list[tuple[str, int, str]], plan: Plan, looks: list[dict]) -> dict[str, Any]:
    history = [{"look": k, "seeds_per_arm": plan.looks[k - 1], "tested": len(records),
                "stopped": sum(r["stopped"] is not None for r in records.values()),
                "open": sum(r["stopped"] is None for r in records.values())}
               for k, records in enumerate(looks, start=1)]
    decisions = []
    for key in keys:
        number, last, tested = latest(key, looks)
        decisions.append({"dataset": key[0], "depth": key[1], "variant": key[2],
                          "decision": last["decision"] if last else "undecided", "look": number,
                          "n": last["n"] if last else 0, "stopped": last["stopped"] if last else None,
                          **{k: tested[k] if tested else None for k in ("delta", "p_value", "alpha_spent")}})
    return {"plan": plan.as_dict(), "max_seeds": plan.looks[-1], "looks": history, "decisions": decisions}


def _tag_decisions(runner: GridRunner, grid_id: str, keys: list[tuple[str, int, str]], plan: Plan,
                   looks: list[dict]) -> None:
    """Each comparison's decision so far as tags on the grid's MLflow run (best effort: the state store holds
    them, and the next run of the command writes them again)."""
    run_id = runner.store.grid(grid_id).mlflow_run_id
    if run_id is None:
        return
    tags = {"ablate.sequential.plan": f"looks={list(plan.looks)} alpha={plan.alpha:g} margin={plan.margin:g} "
                                      f"beta={plan.beta:g} gamma={plan.gamma:g}"}
    for decision in _summary(keys, plan, looks)["decisions"]:
        spent = decision["alpha_spent"]
        tags[f"ablate.decision.{decision['dataset']}.{decision['depth']}.{decision['variant']}"] = (
            f"{decision['decision']} look={decision['look']}/{len(plan.looks)} n={decision['n']} "
            f"alpha_spent={'-' if spent is None else f'{spent:.3g}'} stopped={decision['stopped'] or '-'}")
    try:
        runner.tracker.tag_run(run_id, tags)
    except Exception as exc:
        print(f"ablate: MLflow unreachable ({first_line(exc)[:200]}); "
              f"decisions stay in the state store and are tagged on the next run", file=sys.stderr)
