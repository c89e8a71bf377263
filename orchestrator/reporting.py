"""The HTML report of a grid: stored results and histories handed to `dashboards.report`."""
from __future__ import annotations

import functools
import json
import threading

from ablations.vocabulary import DATASET_SHAPES
from workers.config import TrialConfig

from .results import comparison, grid_spec, grid_status
from .state import BaseStateStore

# A probe is one forward/backward pass at initialisation on the server's CPU, measured at 1.4 s for
# ResNet-56 and 2-12 s for ResNet-164/170 at the papers' width 16 here. So a report probes networks of at
# most that work (depth × width², which grows with width like the activation memory) and at most
# PROBE_MAX_CELLS (depth, variant) cells, the paper's largest table: before, one GET of a report on a grid
# of 28 depths × 40 variants asked for an hour of CPU, and one ResNet-170 of width 1024 for tens of GB.
PROBE_MAX_DEPTH = 170
PROBE_MAX_WORK = PROBE_MAX_DEPTH * 16 ** 2
PROBE_MAX_CELLS = 16
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


def _affordable(config: dict) -> bool:
    model = config["model"]
    return model["depth"] <= PROBE_MAX_DEPTH and model["depth"] * model["width"] ** 2 <= PROBE_MAX_WORK


def grid_report(store: BaseStateStore, grid_id: str, mlflow_url: str | None = None, with_probes: bool = True,
                doc: dict | None = None) -> str:
    """The report; without `with_probes`, no propagation section (and no torch: the grid driver renders it so);
    `doc`: the grid's comparison when the caller has it already."""
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
        if (with_probes and cell not in probed and len(probed) < PROBE_MAX_CELLS
                and _affordable(config := json.loads(t["config"]))):
            probed.add(cell)
            # Normalise the seed away: the probe depends on the architecture, not the trial's seed.
            probe = _probe(json.dumps({**config, "seed": 0}, sort_keys=True))
            probes.append({"variant": t["variant"], "depth": t["depth"], "units": probe["units"],
                           "grad_ratio_first_last": probe["grad_ratio_first_last"]})
    grid = {"id": grid_id, "name": spec.name, "counts": grid_status(store, grid_id),
            "spec": spec.model_dump(mode="json", by_alias=True)}
    with _RENDER_LOCK:
        return render_report(doc or comparison(store, grid_id), rows, grid, probes, mlflow_url)
