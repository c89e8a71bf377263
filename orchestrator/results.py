"""Domain functions over stored results, shared by the CLI and the HTTP API (no HTTP, no printing)."""
from __future__ import annotations

import json
from typing import Any

from ablations.spec import excerpt

from .grids import GridSpec, parse_grid
from .state import StateStore

METRICS = ("test_error", "train_loss", "train_error")


class NotFound(LookupError):
    """No such grid."""


class BadRequest(ValueError):
    """A valid grid, asked something it cannot answer (unknown baseline, metric)."""


def grid_spec(store: StateStore, grid_id: str) -> GridSpec:
    row = store.grid(grid_id)
    if row is None:
        raise NotFound(f"no grid {excerpt(grid_id)}")
    return parse_grid(json.loads(row.spec))


def comparison(store: StateStore, grid_id: str, metric: str = "test_error",
               baseline: str | None = None) -> dict[str, Any]:
    """The comparison document of `ablate compare --format json` and `GET /grids/{id}/comparison`."""
    from dashboards.stats import compare
    from dashboards.tables import document
    spec = grid_spec(store, grid_id)
    if metric not in METRICS:
        raise BadRequest(f"unknown metric {excerpt(metric)}; choose one of: {', '.join(METRICS)}")
    base = baseline or spec.baseline_name
    if base not in spec.variant_names():
        raise BadRequest(f"baseline {excerpt(base)} is not a variant of this grid: {', '.join(spec.variant_names())}")
    try:
        rows = compare(store.results_table(grid_id), baseline=base, metric=metric,
                       variant_order=spec.variant_names(), paper_reference=spec.paper_setting)
    except ValueError as exc:  # e.g. the baseline has no trials in this grid yet
        raise BadRequest(str(exc)) from None
    return document(grid_id, metric, rows)


def grid_status(store: StateStore, grid_id: str) -> dict[str, Any]:
    row = store.grid(grid_id)
    if row is None:
        raise NotFound(f"no grid {excerpt(grid_id)}")
    return {"grid": row.id, "name": row.name, "cancelled": row.cancelled, **store.counts(row.id)}
