"""Domain functions over stored results, shared by the CLI and the HTTP API (no HTTP, no printing)."""
from __future__ import annotations

import json
from typing import Any

from ablations.spec import excerpt
from ablations.vocabulary import METRICS
from dashboards import DEFAULT_DESIGN, DESIGNS

from .grids import GridSpec, parse_grid
from .state import BaseStateStore


class NotFound(LookupError):
    """No such grid."""


class BadRequest(ValueError):
    """A valid grid, asked something it cannot answer (unknown baseline, metric)."""


def grid_spec(store: BaseStateStore, grid_id: str) -> GridSpec:
    row = store.grid(grid_id)
    if row is None:
        raise NotFound(f"no grid {excerpt(grid_id)}")
    return parse_grid(json.loads(row.spec))


def _baseline(spec: GridSpec, baseline: str | None) -> str:
    base = baseline or spec.baseline_name
    if base not in spec.variant_names():
        raise BadRequest(f"baseline {excerpt(base)} is not a variant of this grid: {', '.join(spec.variant_names())}")
    return base


def comparison(store: BaseStateStore, grid_id: str, metric: str = "test_error", baseline: str | None = None,
               design: str = DEFAULT_DESIGN) -> dict[str, Any]:
    """The comparison document of `ablate compare --format json` and `GET /grids/{id}/comparison`.

    Every Ablate grid gives seed s to every variant, so the design is paired; `welch` is there for readers
    who want the independent-samples analysis. A grid run with `--until-decided` has a stored plan: for its
    metric and baseline, each comparison's decision is the plan's (dashboards.sequential.overlay), and the
    design is paired whatever was asked: the plan tested paired differences."""
    from dashboards.sequential import overlay
    from dashboards.stats import compare
    from dashboards.tables import document
    spec = grid_spec(store, grid_id)
    if metric not in METRICS:
        raise BadRequest(f"unknown metric {excerpt(metric)}; choose one of: {', '.join(METRICS)}")
    if design not in DESIGNS:
        raise BadRequest(f"unknown design {excerpt(design)}; choose one of: {', '.join(DESIGNS)}")
    base = _baseline(spec, baseline)
    plan = store.sequential_plan(grid_id)
    if plan is not None and (plan["metric"], plan["baseline"]) != (metric, base):
        plan = None   # the plan decided another question
    if plan is not None:
        design = "paired"   # the plan's looks test paired differences: the rest of each row says the same
    try:
        rows = compare(store.results_table(grid_id), baseline=base, metric=metric,
                       variant_order=spec.variant_names(), paper_reference=spec.paper_setting, design=design,
                       **({"delta": plan["margin"], "alpha": plan["alpha"]} if plan else {}))
    except ValueError as exc:  # e.g. the baseline has no trials in this grid yet
        raise BadRequest(str(exc)) from None
    if plan is not None:
        overlay(rows, plan, store.sequential_looks(grid_id))
    return document(grid_id, metric, rows, alpha=plan["alpha"] if plan else 0.05, design=design, sequential=plan)


def seed_plan(store: BaseStateStore, grid_id: str, delta: float, power: float = 0.8, alpha: float = 0.05,
              baseline: str | None = None) -> dict[str, Any]:
    """`ablate plan` and `GET /grids/{id}/plan`: seeds per comparison to decide a difference of `delta`."""
    from dashboards.planning import plan_seeds
    spec = grid_spec(store, grid_id)
    base = _baseline(spec, baseline)
    try:
        out = plan_seeds(store.results_table(grid_id), base, delta, power, alpha, store.trial_durations(grid_id))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    return {"grid": grid_id, **out}


def grid_status(store: BaseStateStore, grid_id: str) -> dict[str, Any]:
    row = store.grid(grid_id)
    if row is None:
        raise NotFound(f"no grid {excerpt(grid_id)}")
    # mlflow_unsynced: ended trials whose MLflow child runs do not show them yet (a lagging server's backlog).
    return {"grid": row.id, "name": row.name, "grid_cancelled": row.cancelled, **store.counts(row.id),
            "mlflow_unsynced": store.unsynced(row.id)}
