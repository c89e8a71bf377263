"""One self-contained HTML page for a grid: status, comparison tables, plots, propagation probes, trials.

Built from data handed in: the comparison document of `dashboards.tables`, one dict per trial (with its
evaluation history), the grid record and, optionally, propagation-probe results. The page makes no network
request: CSS is inline and the plots are inline SVG drawn here with matplotlib, text kept as text (small
pages, selectable labels). The only links out are to the MLflow UI, when its URL is given.

Plots use matplotlib's object API (`Figure`, saved as SVG) and never pyplot: no backend is selected, no GUI
backend can be, and no global figure registry grows in a long-running server.
"""
from __future__ import annotations

import html
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
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from ablations.paper import FAIL_THRESHOLD

from .stats import MEASURED, STATUSES
from .tables import DESIGN_TEXT, MISSING, SUMMARY_HEADERS, _cells, _complete, _headers, _summary

# Plot text as <text> elements, not glyph paths: a small page with selectable labels.
RC = {"svg.fonttype": "none", "font.size": 9, "axes.titlesize": 10, "font.family": "sans-serif",
      "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"], "axes.spines.top": False,
      "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "legend.frameon": False}
BASELINE_COLOUR = "#222222"
PAPER_COLOUR = "#d62728"
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
           "#aec7e8", "#ffbb78", "#98df8a"]
LINK_STATUSES = ("running", "finished", "diverged", "error")   # trials that have an MLflow run to look at

esc = html.escape


def render_report(doc: dict, trials: list[dict], grid: dict, probes: list[dict] | None = None,
                  mlflow_url: str | None = None) -> str:
    """The whole page as one HTML string (UTF-8 text, no external assets)."""
    doc = _complete(doc)
    rows = doc["rows"]
    baseline = next((r["variant"] for r in rows if r["decision"] == "baseline"), None)
    settings = _ordered([_setting(r["setting"]) for r in rows] + [_setting(t) for t in trials])
    variants = _ordered([r["variant"] for r in rows] + sorted({t["variant"] for t in trials}))
    colours = _colours(variants, baseline)
    with matplotlib.rc_context(RC):
        body = [_header(grid),
                _comparison(doc, settings),
                _errorbars(doc, trials, settings, baseline, colours),
                _curves(trials, settings, variants, colours),
                _probes(probes, colours) if probes else "",
                _trials(trials, settings, variants, mlflow_url)]
    title = f"{grid.get('name') or grid.get('id', 'grid')} – Ablate report"
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f'<style>{CSS}</style>\n</head>\n<body>\n<main>\n{_nav(bool(probes))}\n'
            + "\n".join(part for part in body if part) + "\n</main>\n</body>\n</html>\n")


# --- sections ----------------------------------------------------------------------------------------

def _header(grid: dict) -> str:
    counts = {s: int((grid.get("counts") or {}).get(s) or 0) for s in STATUSES}
    total = sum(counts.values())
    cells = "".join(f'<td class="count-{s}">{counts[s]}</td>' for s in STATUSES)
    bar = "".join(f'<span class="bar-{s}" style="width:{100 * counts[s] / total:.2f}%" title="{s}: {counts[s]}">'
                  f'</span>' for s in STATUSES if counts[s]) if total else ""
    spec = grid.get("spec") or {}
    spec_items = "".join(f"<dt>{esc(str(k))}</dt><dd>{esc(v if isinstance(v, str) else json.dumps(v, default=str))}"
                         "</dd>" for k, v in spec.items())
    generated = datetime.now(timezone.utc).replace(microsecond=0)
    return (f'<header id="header">\n<h1>{esc(str(grid.get("name") or "grid"))} '
            f'<span class="grid-id">{esc(str(grid.get("id", "")))}</span></h1>\n'
            f'<p class="generated">Generated <time datetime="{generated.isoformat()}">'
            f'{generated:%Y-%m-%d %H:%M:%S} UTC</time></p>\n'
            f'<table class="status"><thead><tr>{"".join(f"<th>{s}</th>" for s in STATUSES)}<th>total</th></tr></thead>'
            f'<tbody><tr>{cells}<td class="count-total">{total}</td></tr></tbody></table>\n'
            f'<div class="progress">{bar}</div>\n'
            + (f'<details class="spec"><summary>Grid spec</summary><dl>{spec_items}</dl></details>\n' if spec else "")
            + "</header>")


def _nav(with_probes: bool) -> str:
    parts = [("comparison", "Comparison"), ("errorbars", "Error bars"), ("curves", "Training curves"),
             *([("probes", "Propagation")] if with_probes else []), ("trials", "Trials")]
    return '<nav>' + " · ".join(f'<a href="#{i}">{t}</a>' for i, t in parts) + '</nav>'


def _comparison(doc: dict, settings: list[tuple]) -> str:
    """One table per setting with the columns of `ablate compare` (the setting moves into the caption)."""
    out = []
    headers = _headers(doc)[1:]
    head = "".join(f'<th class="{_column_class(h)}">{esc(h)}</th>' for h in headers)
    for setting in settings:
        rows = [r for r in doc["rows"] if _setting(r["setting"]) == setting]
        if not rows:
            continue
        body = []
        for row in rows:
            decision = row["decision"]
            tds = "".join(f'<td class="{_column_class(h)}{" decision-" + esc(decision) if h == "decision" else ""}">'
                          f"{esc(c)}</td>" for h, c in zip(headers, _cells(row, doc)[1:]))
            body.append(f'<tr class="row-{esc(decision)}" data-variant="{esc(row["variant"])}">{tds}</tr>')
        out.append(f'<table class="comparison" data-dataset="{esc(setting[0])}" data-depth="{setting[1]}">'
                   f"<caption>{esc(_setting_title(setting))}</caption><thead><tr>{head}</tr></thead>"
                   f'<tbody>{"".join(body)}</tbody></table>')
    summary = _summary(doc)
    if summary:
        out.append('<table class="summary"><caption>Across settings (rank 1 = lowest; wins / ties / losses '
                   'against the baseline)</caption>'
                   f'<thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in SUMMARY_HEADERS)}</tr></thead><tbody>'
                   + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in summary)
                   + "</tbody></table>")
    notes = ["lower is better", DESIGN_TEXT.get(doc.get("design"), ""),
             "decisions of the sequential plan (decision @look/looks)" if doc.get("sequential") else "Holm-corrected",
             f'grid {doc["grid"]}']
    title = f'Comparison: {esc(doc["metric"])} <span class="note">{esc(" · ".join(n for n in notes if n))}</span>'

    return _section("comparison", title, "\n".join(out))


def _errorbars(doc: dict, trials: list[dict], settings: list[tuple], baseline: str | None,
               colours: dict[str, str]) -> str:
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
                               f"{esc(_setting_title(setting))}: {esc(metric)} per variant, mean ± {level}% CI; "
                               "dots are seeds, diamonds the paper's figure (median of 5 runs)."))
    return _section("errorbars", f"Per variant: {esc(metric)}, mean ± {level}% CI", _row(figures))


def _clip_failures(ax: Any, rows: list[dict], seeds: list[float]) -> None:
    """Test errors above the paper's "fail" (20%) off the top when others are below it, as arrows with their
    mean: a failed variant near chance would otherwise flatten the differences that matter."""
    means = [r["mean"] for r in rows if r["mean"] is not None]
    shown = [*seeds, *means, *(r["ci_high"] for r in rows if r["ci_high"] is not None),
             *(r["paper"] for r in rows if _finite(r["paper"]))]
    below = [v for v in shown if v <= FAIL_THRESHOLD]
    if not below or len(below) == len(shown):
        return
    low, high = min(below), max(below)
    top = high + 0.12 * max(high - low, 1.0)
    ax.set_ylim(top=top)
    for x, row in enumerate(rows):
        if row["mean"] is not None and row["mean"] > top:
            ax.annotate(f"↑ {row['mean']:.1f}", (x, 0.93), xycoords=("data", "axes fraction"), ha="center",
                        va="top", color="#555555", fontsize=8)


def _curves(trials: list[dict], settings: list[tuple], variants: list[str], colours: dict[str, str]) -> str:
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
                               f"{esc(_setting_title(setting))}: median over seeds (count in brackets) with the "
                               "min–max band; solid: test error (left), dashed: training loss (right)."))
    return _section("curves", "Training curves", _row(figures))


def _probes(probes: list[dict], colours: dict[str, str]) -> str:
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
    body = "".join(f'<tr><td>{esc(label)}</td><td class="num">{_ratio(r)}</td></tr>' for label, r in ratios)
    table = ('<table class="probes"><thead><tr><th>variant</th><th>‖∂E/∂x₁‖ / ‖∂E/∂x_L‖</th></tr></thead>'
             f"<tbody>{body}</tbody></table>")
    figure = _figure("probes", None, fig, "Gradient and signal norms per residual unit at one batch (norms over "
                     "the batch, log scale).")
    return _section("probes", "Propagation probes", _row([figure]) + "\n" + table)


def _trials(trials: list[dict], settings: list[tuple], variants: list[str], mlflow_url: str | None) -> str:
    """Every trial, running ones first, then by setting, variant and seed."""
    setting_rank = {s: i for i, s in enumerate(settings)}
    variant_rank = {v: i for i, v in enumerate(variants)}
    ordered = sorted(trials, key=lambda t: (t.get("status") != "running", setting_rank[_setting(t)],
                                            variant_rank[t["variant"]], t.get("seed") or 0))
    headers = ["variant", "dataset", "depth", "seed", "status", "test error", "MLflow"]
    body = []
    for t in ordered:
        status = str(t.get("status", ""))
        run_id = t.get("mlflow_run_id")
        link = MISSING
        if mlflow_url and run_id and status in LINK_STATUSES:
            # MLflow 3.x's UI routes #/runs/<run_id> (its "direct run page") to the run without the experiment id.
            href = f"{mlflow_url.rstrip('/')}/#/runs/{quote(str(run_id), safe='')}"
            link = f'<a href="{esc(href)}" target="_blank" rel="noopener">{esc(str(run_id)[:8])}</a>'
        body.append(f'<tr class="trial status-{esc(status)}" data-key="{esc(str(t.get("key", "")))}">'
                    f'<td>{esc(str(t["variant"]))}</td><td>{esc(str(t["dataset"]))}</td>'
                    f'<td class="num">{int(t["depth"])}</td>'
                    f'<td class="num">{esc(str(t.get("seed", "")))}</td><td class="status-cell">{esc(status)}</td>'
                    f'<td class="num">{_number(t.get("test_error"))}</td><td>{link}</td></tr>')
    table = (f'<table class="trials"><thead><tr>{"".join(f"<th>{h}</th>" for h in headers)}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table>')
    return _section("trials", f"Trials ({len(trials)})", table if body else "", empty="No trials.")


# --- pieces ------------------------------------------------------------------------------------------

def _section(section_id: str, title: str, content: str, empty: str = "No results yet.") -> str:
    """`title` and `content` are HTML (escaped by the caller); no content gives the `empty` note."""
    inner = content or f'<p class="empty">{esc(empty)}</p>'
    return f'<section id="{section_id}">\n<h2>{title}</h2>\n{inner}\n</section>'


def _row(figures: list[str]) -> str:
    return '<div class="figures">\n' + "\n".join(figures) + "\n</div>" if figures else ""


def _figure(kind: str, setting: tuple | None, fig: Figure, caption: str) -> str:
    """`caption` is HTML (its parts escaped by the caller). A figure claims a row's width in proportion to its
    own (90 px an inch), so a plot of many variants gets a row to itself and its labels keep their size."""
    data = "" if setting is None else f' data-dataset="{esc(setting[0])}" data-depth="{setting[1]}"'
    return (f'<figure class="{kind}"{data} style="flex-basis:{round(90 * fig.get_figwidth())}px">{_svg(fig)}'
            f"<figcaption>{caption}</figcaption></figure>")


def _svg(fig: Figure) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    # Inline in HTML: no XML declaration or DOCTYPE, and no RDF metadata block (a creator line, nothing to see).
    text = text[text.index("<svg"):]
    start, end = text.find(" <metadata>"), text.find("</metadata>\n")
    return text if start < 0 or end < 0 else text[:start] + text[end + len("</metadata>\n"):]


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


CSS = """
:root { --fg: #1d2330; --muted: #6b7280; --line: #e3e6ea; --bg: #fafbfc; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 20px 48px; }
nav { font-size: 13px; margin-bottom: 8px; color: var(--muted); }
nav a { color: #1f5fbf; text-decoration: none; }
h1 { font-size: 22px; margin: 4px 0; }
h1 .grid-id { font: 13px ui-monospace, "DejaVu Sans Mono", monospace; color: var(--muted); font-weight: normal; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h2 .note { font-size: 12px; font-weight: normal; color: var(--muted); margin-left: 8px; }
.generated { color: var(--muted); font-size: 12px; margin: 0 0 8px; }
table { border-collapse: collapse; background: #fff; margin: 8px 0 14px; font-size: 13px; }
caption { text-align: left; font-weight: 600; padding: 4px 0; white-space: nowrap; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { background: #f1f3f5; text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.status td { text-align: right; min-width: 64px; }
.progress { display: flex; height: 8px; max-width: 640px; background: var(--line); border-radius: 4px;
            overflow: hidden; }
.progress span { display: block; height: 100%; }
.bar-finished { background: #2ca02c; } .bar-running { background: #1f77b4; } .bar-queued { background: #c7ccd3; }
.bar-diverged { background: #ff7f0e; } .bar-error { background: #d62728; } .bar-cancelled { background: #8c8c8c; }
details.spec { margin-top: 8px; font-size: 12px; }
details.spec dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 6px 0; }
details.spec dt { color: var(--muted); } details.spec dd { margin: 0; font-family: ui-monospace, monospace; }
tr.row-baseline td { background: #f4f4f6; font-weight: 600; }
td.decision-better { color: #17803d; font-weight: 600; }
td.decision-worse { color: #c0262d; font-weight: 600; }
td.decision-equivalent { color: #0e7490; }
td.decision-undecided { color: var(--muted); }
td.decision-baseline { color: var(--fg); }
.figures { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 4px; padding: 6px;
         flex: 0 1 540px; max-width: 100%; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: var(--muted); padding: 2px 4px; }
.empty { color: var(--muted); font-style: italic; }
table.trials td.status-cell { font-weight: 600; }
tr.status-running td.status-cell { color: #1f77b4; } tr.status-finished td.status-cell { color: #2ca02c; }
tr.status-diverged td.status-cell { color: #ff7f0e; } tr.status-error td.status-cell { color: #d62728; }
tr.status-queued td.status-cell, tr.status-cancelled td.status-cell { color: var(--muted); }
a { color: #1f5fbf; }
"""
