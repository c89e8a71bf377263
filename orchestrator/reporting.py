"""The HTML report of a grid: stored results and histories handed to `dashboards.report`."""
from __future__ import annotations

import functools
import json
import threading

from ablations.spec import DATASET_SHAPES
from workers.config import TrialConfig

from .results import comparison, grid_spec, grid_status
from .state import BaseStateStore

# A probe is one forward/backward pass at initialisation on the server's CPU: fine up to ResNet-164.
PROBE_MAX_DEPTH = 170
# matplotlib's rc settings are process-global: the service renders one report at a time.
_RENDER_LOCK = threading.Lock()


@functools.lru_cache(maxsize=64)
def _probe(config_json: str) -> dict:
    """Propagation at initialisation for one trial configuration (cached: the report asks again and again)."""
    import torch
    from ablations import build_model, probe_propagation  # torch
    config = TrialConfig.model_validate_json(config_json)
    channels, size, classes = DATASET_SHAPES[config.dataset]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, channels, size, size, generator=gen)
    y = torch.randint(0, classes, (16,), generator=gen)
    return probe_propagation(build_model(config.model), x, y)


def grid_report(store: BaseStateStore, grid_id: str, mlflow_url: str | None = None) -> str:
    from dashboards.report import render_report  # matplotlib
    spec = grid_spec(store, grid_id)
    trials = store.grid_trials(grid_id)
    rows = []
    probes, probed = [], set()
    for t in trials:
        result = t["result"] or {}
        rows.append({k: t[k] for k in ("key", "dataset", "depth", "variant", "seed", "status", "test_error",
                                       "mlflow_run_id")} | {"history": result.get("history", [])})
        cell = (t["depth"], t["variant"])
        if cell not in probed and t["depth"] <= PROBE_MAX_DEPTH:
            probed.add(cell)
            config = json.loads(t["config"])
            # Normalise the seed away: the probe depends on the architecture, not the trial's seed.
            probe = _probe(json.dumps({**config, "seed": 0}, sort_keys=True))
            probes.append({"variant": t["variant"], "depth": t["depth"], "units": probe["units"],
                           "grad_ratio_first_last": probe["grad_ratio_first_last"]})
    grid = {"id": grid_id, "name": spec.name, "counts": grid_status(store, grid_id),
            "spec": spec.model_dump(mode="json", by_alias=True)}
    with _RENDER_LOCK:
        return render_report(comparison(store, grid_id), rows, grid, probes, mlflow_url)
