"""What a grid's MLflow parent run shows, built from the state store (no MLflow calls here).

The parent run belongs to the grid's name: a grid grown under the same name (more seeds, depths or
variants) is a new grid id and keeps the parent. It shows the latest grid:
- tags: `ablate.grid` (the latest grid id), `ablate.grids` (every grid id it has held, oldest first),
  `ablate.state` (running, finished, decided, cancelled, interrupted), `ablate.progress` and `ablate.eta`,
  and a description (`mlflow.note.content`) saying what the grid is and how to read its table;
- metrics: the `trials_<state>` counts, `eta_s`, `mlflow_unsynced` (ended trials whose child runs do not
  show them yet), and per cell (setting × variant) of the comparison
  `<setting>/<variant>/<stat>` with the number of ended trials as step, so a chart shows a cell's mean
  and interval settling as seeds finish; `<setting>/<variant>/decision` is the decision as a number
  (DECISION_CODES) with a tag of the same name saying it in words;
- artifacts: `comparison.json` (the rows of `ablate compare --format json`, as an MLflow table),
  `reused_trials.json` (trials this grid took from other grids' runs, with links) and `report.html`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ablations.vocabulary import ENDED

from .grids import GridSpec
from .results import BadRequest, comparison
from .state import StateStore
from .tracking import duration

# 0: no decision yet; the sign: the direction of a decided difference; 2: decided "no difference".
DECISION_CODES = {"undecided": 0, "better": 1, "worse": -1, "equivalent": 2}
CELL_STATS = ("n", "mean", "ci_low", "ci_high", "delta", "delta_ci_low", "delta_ci_high", "p_holm")
COMPARISON, REUSED, REPORT = "comparison.json", "reused_trials.json", "report.html"
# The comparison table's columns: what a reader looks at first, then the rest in the document's order.
COMPARISON_FIRST = ("setting", "variant", "decision", "n", "mean", "ci_low", "ci_high", "delta", "delta_ci_low",
                    "delta_ci_high", "p_holm")
REUSED_COLUMNS = ("variant", "dataset", "depth", "seed", "status", "test_error", "trial", "run", "link")


@dataclass
class ParentView:
    tags: dict[str, str]
    metrics: dict[str, float]
    step: int  # trials ended: the x axis of the parent's metrics
    tables: dict[str, dict[str, list]] = field(default_factory=dict)  # artifact file → {columns, data}
    files: dict[str, str] = field(default_factory=dict)  # artifact file → text


def progress_line(counts: dict[str, int]) -> str:
    """"3/6 done · 2 running · 1 queued": the same line on the terminal and on the parent run."""
    done = counts["finished"] + counts["diverged"]
    return (f"{done}/{sum(counts.values())} done · {counts['running']} running · {counts['queued']} queued"
            + (f" · {counts['error']} error" if counts["error"] else ""))


def setting_label(setting: dict[str, Any]) -> str:
    """{"dataset": "cifar10", "depth": 110} → "cifar10-d110" (any further setting fields appended)."""
    return "-".join(f"d{v}" if k == "depth" else str(v) for k, v in setting.items())


def metric_name(*parts: str) -> str:
    """Parts joined by "/", each made a valid MLflow name segment (no "." or ".." path segment)."""
    clean = [re.sub(r"[^\w.\- ]", "_", p) for p in parts]
    return "/".join("_" * len(p) if set(p) <= {"."} else p for p in clean)


def cell_summary(doc: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Per-cell metrics and decision tags of a comparison document."""
    metrics, tags = {}, {}
    for row in doc["rows"]:
        cell = (setting_label(row["setting"]), row["variant"])
        for stat in CELL_STATS:
            if row.get(stat) is not None:
                metrics[metric_name(*cell, stat)] = float(row[stat])
        tags[metric_name(*cell, "decision")] = row["decision"]
        if row["decision"] in DECISION_CODES:
            metrics[metric_name(*cell, "decision")] = float(DECISION_CODES[row["decision"]])
    return metrics, tags


def table(rows: list[dict[str, Any]], columns: tuple[str, ...] = ()) -> dict[str, list]:
    """Rows as MLflow's table artifacts hold them (pandas' "split" layout), which its UI shows as a table;
    `columns` first, then every other key of the rows."""
    columns = list(dict.fromkeys([*columns, *(k for row in rows for k in row)]))
    return {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}


def grid_state(counts: dict[str, int], cancelled: bool, doc: dict[str, Any] | None) -> str | None:
    if cancelled:
        return "cancelled"
    if counts["queued"] + counts["running"]:
        return "running"
    if doc is None:
        return None  # ended, but whether it is decided needs the comparison
    compared = [r["decision"] for r in doc["rows"] if r["decision"] != "baseline"]
    return "decided" if compared and "undecided" not in compared else "finished"


def describe(spec: GridSpec, grid_id: str, grid_ids: list[str]) -> str:
    """The parent run's description (markdown): what the grid is and how to read what it shows."""
    seeds = spec.seed_list
    others = [g for g in grid_ids if g != grid_id]
    lines = [
        f"**Ablate grid `{spec.name}`**: {len(spec.variant_names())} variants × depths "
        f"{', '.join(map(str, spec.depths))} × {len(seeds)} seeds on {', '.join(spec.datasets)}"
        + (f" (first {spec.subset} training images)" if spec.subset else "")
        + f", baseline `{spec.baseline_name}`. Grid id `{grid_id}`"
        + (f"; this run also holds the other grids of this name: {', '.join(f'`{g}`' for g in others)}."
           if others else "."),
        "",
        "Each child run is one trial (tags `ablate.variant`, `ablate.depth`, `ablate.seed`; its curves under "
        "Model metrics, CPU/GPU use under System metrics). A trial this grid took from another grid's run is "
        "not logged twice: `reused_trials.json` links it.",
        "",
        f"**Reading the comparison** (Artifacts → `{COMPARISON}`, the rows of `ablate compare --format json`; "
        f"`{REPORT}`, the full report): one row per setting × variant, test error in % over the seeds: "
        "`n` runs, `mean` with its 95% CI `[ci_low, ci_high]`, `delta` = variant − baseline with its CI, "
        "`p_holm` (Welch's test, Holm-corrected across the table) and `decision`: `better` / `worse` when "
        "p_holm < 0.05 and the variant beats the baseline in over 75% / under 25% of run pairs, `equivalent` "
        "when the whole delta CI lies within ±0.2 points, else `undecided`. Lower is better.",
        "",
        "**Metrics**: `<setting>/<variant>/<stat>` per cell against the number of ended trials (step); "
        "`…/decision`: 1 better, -1 worse, 2 equivalent, 0 undecided (the tag of the same name says it in words). "
        "`ablate.state`: running, finished (some comparisons undecided), decided, cancelled or interrupted; "
        "`ablate.progress` and `ablate.eta` while it runs.",
    ]
    return "\n".join(lines)


def build(store: StateStore, spec: GridSpec, grid_id: str, parent: str, *, children: set[str],
          eta_s: float | None, full: bool, state: str | None = None, mlflow_url: str | None = None) -> ParentView:
    """The parent run's content now. Without `full`, only progress (cheap, while trials run); with it, the
    comparison, its tables and the report too. `children`: the run ids under this parent (the others a trial
    of this grid holds were reused from another grid). `state` overrides the derived one (interrupted)."""
    counts = store.counts(grid_id)
    step = sum(counts[s] for s in ENDED)
    metrics: dict[str, float] = {f"trials_{k}": float(v) for k, v in counts.items()}
    if eta_s is not None:
        metrics["eta_s"] = eta_s
    # MLflow's backlog: ended trials whose child runs do not show them yet (the driver syncs them while the
    # grid runs and after; a server slower than the cluster makes it grow instead of slowing the grid).
    metrics["mlflow_unsynced"] = float(store.unsynced(grid_id))
    remaining = counts["queued"] + counts["running"]
    grid_ids = store.run_grids(parent) or [grid_id]
    doc = None
    tags = {"ablate.grid": grid_id, "ablate.grids": ",".join(grid_ids), "ablate.progress": progress_line(counts),
            "ablate.eta": duration(eta_s) if remaining else "0s",
            "mlflow.note.content": describe(spec, grid_id, grid_ids)}
    view = ParentView(tags, metrics, step)
    if full:
        try:
            doc = comparison(store, grid_id)
        except BadRequest:
            doc = None  # the baseline has no trials yet: nothing to compare
        if doc is not None:
            from dashboards.tables import render
            rows = json.loads(render(doc, "json"))["rows"]  # exactly what `compare --format json` prints
            view.tables[COMPARISON] = table(rows, COMPARISON_FIRST)
            cells, decisions = cell_summary(doc)
            metrics.update(cells)
            tags.update(decisions)
            from .reporting import grid_report
            # Without the propagation probes: they need torch, which the grid driver never imports.
            view.files[REPORT] = grid_report(store, grid_id, mlflow_url, with_probes=False, doc=doc)
        view.tables[REUSED] = table(reused(store, grid_id, children, mlflow_url), REUSED_COLUMNS)
    derived = state or grid_state(counts, store.is_cancelled(grid_id), doc)
    if derived:
        tags["ablate.state"] = derived
    return view


def reused(store: StateStore, grid_id: str, children: set[str], mlflow_url: str | None) -> list[dict[str, Any]]:
    """The grid's trials whose run lives under another grid's parent run."""
    base = mlflow_url.rstrip("/") if mlflow_url else ""
    return [{"variant": t["variant"], "dataset": t["dataset"], "depth": t["depth"], "seed": t["seed"],
             "status": t["status"], "test_error": t["test_error"], "trial": t["key"], "run": t["mlflow_run_id"],
             "link": f"{base}/#/runs/{t['mlflow_run_id']}"}
            for t in store.grid_trials(grid_id) if t["mlflow_run_id"] and t["mlflow_run_id"] not in children]
