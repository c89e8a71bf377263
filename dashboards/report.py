"""One self-contained HTML page for a grid: status, comparison tables, plots, propagation probes, trials.

Built from data handed in: the comparison document of `dashboards.tables`, one dict per trial (with its
evaluation history), the grid record and, optionally, propagation-probe results. This module turns them into
the context of the template templates/report.html.j2 (markup there, escaped on output, dashboards.pages);
the plots are drawn here. The page makes no network request: CSS is inline and the plots are inline SVG
drawn with matplotlib, text kept as text (small pages, selectable labels). The only links out are to the
MLflow UI, when its URL is given.

Plots use matplotlib's object API (`Figure`, saved as SVG) and never pyplot: no backend is selected, no GUI
backend can be, and no global figure registry grows in a long-running server.
"""
from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import matplotlib
import numpy as np
from markupsafe import Markup
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from ablations.paper import FAIL_THRESHOLD
from ablations.vocabulary import ENDED, MEASURED, STATUSES

from .pages import check_link_base, render_page
from .tables import DESIGN_TEXT, MISSING, SUMMARY_HEADERS, _cells, _complete, _headers, _summary

# Plot text as <text> elements, not glyph paths: a small page with selectable labels.
RC = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "font.family": "sans-serif",
      "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"], "axes.spines.top": False,
      "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False}
BASELINE_COLOUR = "#222222"
PAPER_COLOUR = "#d62728"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
           "#aec7e8", "#ffbb78", "#98df8a"]
LINK_STATUSES = ("running", *ENDED)   # trials that have an MLflow run to look at


def render_report(doc: dict, trials: list[dict], grid: dict, probes: list[dict] | None = None,
                  mlflow_url: str | None = None) -> str:
    """The whole page as one HTML string (UTF-8 text, no external assets)."""
    if mlflow_url is not None:
        check_link_base(mlflow_url)
    doc = _complete(doc)
    rows = doc["rows"]
    baseline = next((r["variant"] for r in rows if r["decision"] == "baseline"), None)
    settings = _ordered([_setting(r["setting"]) for r in rows] + [_setting(t) for t in trials])
    variants = _ordered([r["variant"] for r in rows] + sorted({t["variant"] for t in trials}))
    colours = _colours(variants, baseline)
    with matplotlib.rc_context(RC):
        sections = {"header": _header(grid),
                    "comparison": _comparison(doc, settings),
                    "errorbars": _errorbars(doc, trials, settings, baseline, colours),
                    "curves": _curves(trials, settings, variants, colours),
                    "probes": _probes(probes, colours) if probes else None,
                    "trials": _trials(trials, settings, variants, mlflow_url)}
    nav = [("comparison", "Comparison"), ("errorbars", "Error bars"), ("curves", "Training curves"),
           *([("probes", "Propagation")] if probes else []), ("trials", "Trials")]
    return render_page("report.html.j2", title=f"{grid.get('name') or grid.get('id', 'grid')} – Ablate report",
                       nav=nav, statuses=STATUSES, missing=MISSING, **sections)


# --- sections: each gives its part of the template's context -----------------------------------------

def _header(grid: dict) -> dict:
    counts = {s: int((grid.get("counts") or {}).get(s) or 0) for s in STATUSES}
    spec = grid.get("spec") or {}
    return {"name": str(grid.get("name") or "grid"), "id": str(grid.get("id", "")), "counts": counts,
            "total": sum(counts.values()), "generated": datetime.now(timezone.utc).replace(microsecond=0),
            "spec": [(str(k), v if isinstance(v, str) else json.dumps(v, default=str)) for k, v in spec.items()]}


def _comparison(doc: dict, settings: list[tuple]) -> dict:
    """One table per setting with the columns of `ablate compare` (the setting moves into the caption)."""
    headers = _headers(doc)[1:]
    tables = []
    for setting in settings:
        rows = [r for r in doc["rows"] if _setting(r["setting"]) == setting]
        if rows:
            tables.append({"setting": setting, "caption": _setting_title(setting),
                           "rows": [{"decision": row["decision"], "variant": row["variant"],
                                     "cells": [(h, _column_class(h), c) for h, c in zip(headers, _cells(row, doc)[1:])]}
                                    for row in rows]})
    notes = ["lower is better", DESIGN_TEXT.get(doc.get("design"), ""),
             "decisions of the sequential plan (decision @look/looks)" if doc.get("sequential") else "Holm-corrected",
             f'grid {doc["grid"]}']
    return {"metric": doc["metric"], "note": " · ".join(n for n in notes if n),
            "headers": [(h, _column_class(h)) for h in headers], "tables": tables,
            "summary_headers": SUMMARY_HEADERS, "summary": _summary(doc)}


def _errorbars(doc: dict, trials: list[dict], settings: list[tuple], baseline: str | None,
               colours: dict[str, str]) -> dict:
    """Per setting: each variant's mean with its CI, the seeds as dots, the paper's figure as a marker."""
    metric = doc["metric"]
    level = round(100 * (1 - doc["alpha"]))
    figures = []
    for setting in settings:
        rows = [r for r in doc["rows"] if _setting(r["setting"]) == setting]
        if not any(r["mean"] is not None for r in rows):
            continue
        values = defaultdict(list)
        for t in trials:
            v = t.get(metric)
            if _setting(t) == setting and t.get("status") in MEASURED and _finite(v):
                values[t["variant"]].append(float(v))
        fig = Figure(figsize=(max(6.4, 0.9 * len(rows) + 2.5), 3.9), layout="constrained")
        ax = fig.add_subplot()
        rng = np.random.default_rng(0)   # fixed jitter: the same page for the same data
        for x, row in enumerate(rows):
            variant, colour = row["variant"], colours[row["variant"]]
            if variant == baseline:
                ax.axvspan(x - 0.45, x + 0.45, color="#000000", alpha=0.06, lw=0)
                if row["mean"] is not None:
                    ax.axhline(row["mean"], color=BASELINE_COLOUR, lw=0.8, ls=":", zorder=1)
            seeds = values.get(variant, [])
            if seeds:
                ax.scatter(x + 0.22 + rng.uniform(-0.06, 0.06, len(seeds)), seeds, s=12, color=colour, alpha=0.55,
                           lw=0, zorder=2)
            if row["mean"] is not None:
                err = None
                if row["ci_low"] is not None:
                    err = [[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]]
                ax.errorbar([x], [row["mean"]], yerr=err, fmt="o", color=colour, ms=6, capsize=4, lw=1.6, zorder=3)
            paper = row["paper"]
            if _finite(paper):
                ax.plot([x - 0.22], [paper], marker="D", ms=6, mfc="none", mec=PAPER_COLOUR, mew=1.4, ls="none",
                        zorder=3)
            elif paper == "fail":
                ax.annotate("paper: fail", (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top",
                            color=PAPER_COLOUR, fontsize=8)
        ax.set_xticks(range(len(rows)), [f'{_plain(r["variant"])}\nn={r["n"]}' for r in rows],
                      rotation=25 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
        for label, row in zip(ax.get_xticklabels(), rows):
            if row["variant"] == baseline:
                label.set_fontweight("bold")
        ax.set_xlim(-0.6, len(rows) - 0.4)
        if metric == "test_error":
            _clip_failures(ax, rows, [v for vs in values.values() for v in vs])
        ax.set_ylabel(_metric_label(metric))
        ax.grid(axis="x", visible=False)
        ax.set_title(_plain(_setting_title(setting)))
        handles = [Line2D([], [], marker="o", color="#555555", label=f"mean ± {level}% CI"),
                   Line2D([], [], marker="o", ls="none", color="#555555", alpha=0.55, ms=4, label="seeds")]
        if any(_finite(r["paper"]) for r in rows):
            handles.append(Line2D([], [], marker="D", ls="none", mfc="none", mec=PAPER_COLOUR, label="paper"))
        if baseline is not None:
            handles.append(Line2D([], [], color=BASELINE_COLOUR, ls=":", lw=0.8, label="baseline mean"))
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)
        figures.append(_figure("errorbars", setting, fig,
                               f"{_setting_title(setting)}: {metric} per variant, mean ± {level}% CI; "
                               "dots are seeds, diamonds the paper's figure (median of 5 runs)."))
    return {"title": f"Per variant: {metric}, mean ± {level}% CI", "figures": figures}


def _clip_failures(ax: Any, rows: list[dict], seeds: list[float]) -> None:
    """Test errors above the paper's "fail" (20%) off the top when others are below it, as arrows with their
    mean: a failed variant near chance would otherwise flatten the differences that matter."""
    means = [r["mean"] for r in rows if r["mean"] is not None]
    shown = [*seeds, *means, *(r["ci_high"] for r in rows if r["ci_high"] is not None),
             *(r["paper"] for r in rows if _finite(r["paper"]))]
    below = [v for v in shown if v <= FAIL_THRESHOLD]
    if not below or len(below) == len(shown):
        return
    # Only what would flatten the rest goes off the top: a variant just past 20% (the demo's dropout-0.5 at
    # 20.6 against 14.4) stays drawn, seeds and CI whole; one near chance (90%) does not.
    low, high = min(below), max(below)
    kept = [v for v in shown if v <= high + 3 * max(high - low, 1.0)]
    if len(kept) == len(shown):
        return
    low, high = min(kept), max(kept)
    top = high + 0.12 * max(high - low, 1.0)
    ax.set_ylim(top=top)
    for x, row in enumerate(rows):
        if row["mean"] is not None and row["mean"] > top:
            ax.annotate(f"↑ {row['mean']:.1f}", (x, 0.93), xycoords=("data", "axes fraction"), ha="center",
                        va="top", color="#555555", fontsize=8)


def _curves(trials: list[dict], settings: list[tuple], variants: list[str], colours: dict[str, str]) -> list[dict]:
    """Per setting, as in the paper's Fig. 6: test error (solid, left axis) and training loss (dashed, right
    axis, log scale: a diverging run does not flatten the others) against iterations; the median over seeds
    with a min–max band."""
    figures = []
    for setting in settings:
        histories = defaultdict(list)
        for t in trials:
            if _setting(t) == setting and t.get("history"):
                histories[t["variant"]].append(t["history"])
        if not histories:
            continue
        fig = Figure(figsize=(6.4, 3.9), layout="constrained")
        ax = fig.add_subplot()
        loss_ax = ax.twinx()
        loss_ax.spines["right"].set_visible(True)
        loss_ax.grid(False)
        handles, last_errors = [], []
        for variant in (v for v in variants if v in histories):
            colour = colours[variant]
            steps, mid, low, high = _band(histories[variant], "test_error", _finite)
            if steps.size:
                ax.plot(steps, mid, color=colour, lw=1.6)
                ax.fill_between(steps, low, high, color=colour, alpha=0.15, lw=0)
                last_errors.append(mid[-1])
            steps, mid, low, high = _band(histories[variant], "train_loss", _positive)
            if steps.size:
                loss_ax.plot(steps, mid, ls="--", color=colour, lw=1.1)
                loss_ax.fill_between(steps, low, high, color=colour, alpha=0.08, lw=0)
            handles.append(Line2D([], [], color=colour, lw=2, label=f"{_plain(variant)} ({len(histories[variant])})"))
        working = [e for e in last_errors if e <= FAIL_THRESHOLD]
        if working:
            # Twice the worst latest median of the runs that did not fail, as the paper's 0–20% axes: the end of
            # training, where variants differ, stays readable; early evaluations and failed runs run off the top.
            ax.set_ylim(0, max(5.0, 2 * max(working)))
        if loss_ax.lines:
            loss_ax.set_yscale("log")
        ax.set_xlabel("iterations")
        ax.set_ylabel("test error (%)")
        loss_ax.set_ylabel("training loss")
        ax.xaxis.set_major_formatter(FuncFormatter(_iterations))
        ax.set_title(_plain(_setting_title(setting)))
        handles += [Line2D([], [], color="#555555", ls="-", label="test error"),
                    Line2D([], [], color="#555555", ls="--", label="train loss")]
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)
        figures.append(_figure("curves", setting, fig,
                               f"{_setting_title(setting)}: median over seeds (count in brackets) with the "
                               "min–max band; solid: test error (left), dashed: training loss (right)."))
    return figures


def _probes(probes: list[dict], colours: dict[str, str]) -> dict:
    """‖∂E/∂x_l‖ and ‖x_l‖ per unit, one line per variant (Eqn. 4–5: identity paths keep both flat)."""
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    grad_ax, x_ax = fig.subplots(1, 2)
    several_depths = len({p.get("depth") for p in probes}) > 1
    ratios, handles = [], []
    for probe in probes:
        label = f'{probe["variant"]} ({probe.get("depth")})' if several_depths else str(probe["variant"])
        colour = colours.get(probe["variant"]) or PALETTE[len(ratios) % len(PALETTE)]
        units = probe.get("units") or []
        for axis, key in ((grad_ax, "grad_norm"), (x_ax, "x_norm")):
            points = [(u["unit"], u[key]) for u in units if _positive(u.get(key))]
            if points:
                axis.plot(*zip(*points), color=colour, lw=1.4)
        ratios.append((label, probe.get("grad_ratio_first_last")))
        handles.append(Line2D([], [], color=colour, lw=2, label=_plain(label)))
    for axis, title in ((grad_ax, "‖∂E/∂x_l‖ per unit"), (x_ax, "‖x_l‖ per unit")):
        if axis.lines:
            axis.set_yscale("log")
        axis.set_xlabel("unit l")
        axis.set_title(title)
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    figure = _figure("probes", None, fig, "Gradient and signal norms per residual unit at one batch (norms over "
                     "the batch, log scale).")
    return {"figure": figure, "ratios": [(label, _ratio(r)) for label, r in ratios]}


def _trials(trials: list[dict], settings: list[tuple], variants: list[str], mlflow_url: str | None) -> list[dict]:
    """Every trial, running ones first, then by setting, variant and seed."""
    setting_rank = {s: i for i, s in enumerate(settings)}
    variant_rank = {v: i for i, v in enumerate(variants)}
    ordered = sorted(trials, key=lambda t: (t.get("status") != "running", setting_rank[_setting(t)],
                                            variant_rank[t["variant"]], t.get("seed") or 0))
    out = []
    for t in ordered:
        status = str(t.get("status", ""))
        run_id = t.get("mlflow_run_id")
        run = None
        if mlflow_url and run_id and status in LINK_STATUSES:
            # MLflow 3.x's UI routes #/runs/<run_id> (its "direct run page") to the run without the experiment id.
            run = {"href": f"{mlflow_url.rstrip('/')}/#/runs/{quote(str(run_id), safe='')}", "text": str(run_id)[:8]}
        out.append({"status": status, "key": str(t.get("key", "")), "variant": str(t["variant"]),
                    "dataset": str(t["dataset"]), "depth": int(t["depth"]), "seed": str(t.get("seed", "")),
                    "test_error": _number(t.get("test_error")), "run": run})
    return out


# --- pieces ------------------------------------------------------------------------------------------

def _figure(kind: str, setting: tuple | None, fig: Figure, caption: str) -> dict:
    """A figure claims a row's width in proportion to its own (90 px an inch), so a plot of many variants gets
    a row to itself and its labels keep their size."""
    return {"kind": kind, "setting": setting, "width": round(90 * fig.get_figwidth()), "svg": _svg(fig),
            "caption": caption}


def _svg(fig: Figure) -> Markup:
    """The figure as inline SVG: markup Ablate drew, so the one thing pages take unescaped (matplotlib
    escapes the labels it writes, variant names included)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    # Inline in HTML: no XML declaration or DOCTYPE, and no RDF metadata block (a creator line, nothing to see).
    text = text[text.index("<svg"):]
    start, end = text.find(" <metadata>"), text.find("</metadata>\n")
    return Markup(text if start < 0 or end < 0 else text[:start] + text[end + len("</metadata>\n"):])


def _band(histories: list[list[dict]], key: str, keep) -> tuple[np.ndarray, ...]:
    """Steps with at least one kept value, and the median, min and max over the runs at each."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for history in histories:
        for record in history:
            if keep(record.get(key)) and record.get("step") is not None:
                by_step[int(record["step"])].append(float(record[key]))
    steps = sorted(by_step)
    values = [by_step[s] for s in steps]
    return (np.array(steps), np.array([np.median(v) for v in values]), np.array([min(v) for v in values]),
            np.array([max(v) for v in values]))


def _setting(item: dict) -> tuple[str, int]:
    return str(item["dataset"]), int(item["depth"])


def _setting_title(setting: tuple) -> str:
    return f"{setting[0]} ResNet-{setting[1]}"


def _plain(text: str) -> str:
    """`text` shown by matplotlib as it is: a "$" would otherwise start mathtext."""
    return str(text).replace("$", r"\$")


def _ordered(items: Iterable) -> list:
    return list(dict.fromkeys(items))


def _colours(variants: list[str], baseline: str | None) -> dict[str, str]:
    others = [v for v in variants if v != baseline]
    colours = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(others)}
    if baseline is not None:
        colours[baseline] = BASELINE_COLOUR
    return colours


def _column_class(header: str) -> str:
    return "text" if header in ("variant", "decision") else "num"


def _metric_label(metric: str) -> str:
    return f"{metric.replace('_', ' ')} (%)" if metric.endswith("_error") else metric.replace("_", " ")


def _iterations(x: float, _pos: Any) -> str:
    return f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive(x: Any) -> bool:
    return _finite(x) and x > 0


def _number(x: Any) -> str:
    return f"{x:.2f}" if _finite(x) else MISSING


def _ratio(x: Any) -> str:
    if isinstance(x, (int, float)) and math.isinf(x):
        return "∞"
    return f"{x:.3g}" if _finite(x) else MISSING
