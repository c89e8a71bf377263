"""Domain functions over stored results, shared by the CLI and the HTTP API (no HTTP, no printing)."""
from __future__ import annotations

import json
from typing import Any

from .grids import GridSpec, parse_grid
from .state import StateStore

# test_error is the top-1 error; test_error_top5 is reported on ImageNet-style datasets only.
METRICS = ("test_error", "test_error_top5", "train_loss", "train_error")


class NotFound(LookupError):
    """No such grid."""


class BadRequest(ValueError):
    """A valid grid, asked something it cannot answer (unknown baseline, metric)."""


def grid_spec(store: StateStore, grid_id: str) -> GridSpec:
    row = store.grid(grid_id)
    if row is None:
        raise NotFound(f"no grid {grid_id!r}")
    return parse_grid(json.loads(row.spec))


def comparison(store: StateStore, grid_id: str, metric: str = "test_error",
               baseline: str | None = None) -> dict[str, Any]:
    """The comparison document of `ablate compare --format json` and `GET /grids/{id}/comparison`."""
    from dashboards.stats import compare
    from dashboards.tables import document
    spec = grid_spec(store, grid_id)
    if metric not in METRICS:
        raise BadRequest(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}")
    base = baseline or spec.baseline_name
    if base not in spec.variant_names():
        raise BadRequest(f"baseline {base!r} is not a variant of this grid: {', '.join(spec.variant_names())}")
    table = store.results_table(grid_id)
    if metric not in table.column_names:
        table = table.append_column(metric, [_from_records(store, grid_id, table, metric)])
    try:
        rows = compare(table, baseline=base, metric=metric,
                       variant_order=spec.variant_names(), paper_reference=spec.paper_setting)
    except ValueError as exc:  # e.g. the baseline has no trials in this grid yet
        raise BadRequest(str(exc)) from None
    return document(grid_id, metric, rows)


def _from_records(store: StateStore, grid_id: str, table, metric: str) -> list[float | None]:
    """A metric the state keeps no column for (top-5 error), read from the trials' result records, in the
    table's row order."""
    values = {(t["dataset"], t["depth"], t["variant"], t["seed"]): (t["result"] or {}).get(metric)
              for t in store.grid_trials(grid_id)}
    keys = zip(*(table[c].to_pylist() for c in ("dataset", "depth", "variant", "seed")))
    return [values.get(key) for key in keys]


def grid_status(store: StateStore, grid_id: str) -> dict[str, Any]:
    row = store.grid(grid_id)
    if row is None:
        raise NotFound(f"no grid {grid_id!r}")
    return {"grid": row.id, "name": row.name, "cancelled": row.cancelled, **store.counts(row.id)}
