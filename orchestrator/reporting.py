"""The HTML report of a grid: stored results and histories handed to `dashboards.report`."""
from __future__ import annotations

import functools
import json
import threading
from typing import Callable

from .results import comparison, grid_spec, grid_status
from .state import StateStore

# A probe is one forward/backward pass at initialisation on the server's CPU: fine up to ResNet-164.
PROBE_MAX_DEPTH = 170
# matplotlib's rc settings are process-global: the service renders one report at a time.
_RENDER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=64)
def _probe(config_json: str) -> dict:
    """Propagation at initialisation for one trial configuration (cached: the report asks again and again)."""
    import torch
    from ablations import build_model, probe_propagation
    from ablations.spec import DATASET_SHAPES
    from workers.config import TrialConfig
    config = TrialConfig.model_validate_json(config_json)
    channels, size, classes = DATASET_SHAPES[config.dataset]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, channels, size, size, generator=gen)
    y = torch.randint(0, classes, (16,), generator=gen)
    return probe_propagation(build_model(config.model), x, y)


def probe_all(configs: list[str]) -> list[dict]:
    """Propagation at initialisation for each trial configuration (JSON), in this process."""
    return [_probe(c) for c in configs]


def grid_report(store: StateStore, grid_id: str, mlflow_url: str | None = None,
                probes: Callable[[list[str]], list[dict]] | None = probe_all, doc: dict | None = None) -> str:
    """The report; `probes` computes the propagation section (None: no such section, and no torch import,
    as on the grid driver); `doc`: the grid's comparison when the caller has it already."""
    from dashboards.report import render_report
    spec = grid_spec(store, grid_id)
    trials = store.grid_trials(grid_id)
    rows, cells = [], {}
    for t in trials:
        result = t["result"] or {}
        rows.append({k: t[k] for k in ("key", "dataset", "depth", "variant", "seed", "status", "test_error",
                                       "mlflow_run_id")} | {"history": result.get("history", [])})
        if (t["depth"], t["variant"]) not in cells and t["depth"] <= PROBE_MAX_DEPTH:
            # Normalise the seed away: the probe depends on the architecture, not the trial's seed.
            cells[t["depth"], t["variant"]] = json.dumps({**json.loads(t["config"]), "seed": 0}, sort_keys=True)
    found = probes(list(cells.values())) if probes and cells else []
    probed = [{"variant": variant, "depth": depth, "units": probe["units"],
               "grad_ratio_first_last": probe["grad_ratio_first_last"]}
              for (depth, variant), probe in zip(cells, found)]
    grid = {"id": grid_id, "name": spec.name, "counts": grid_status(store, grid_id),
            "spec": spec.model_dump(mode="json", by_alias=True)}
    with _RENDER_LOCK:
        return render_report(doc or comparison(store, grid_id), rows, grid, probed, mlflow_url)
