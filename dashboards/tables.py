"""Comparison tables in every output format of `ablate compare`, from one document.

The document is what `compare --format json` prints: `{grid, metric, alpha, design, sequential, rows, summary}`,
with `rows` from `dashboards.stats.compare` (and, for a grid run with `--until-decided`, each comparison's
stored decision from `dashboards.sequential.overlay`), `summary` from `dashboards.stats.summary` (computed
here when absent), `design` how Δ was computed (`paired` by seed, or `welch`) and `sequential` the stored
plan (or null). Human formats (`table`, `markdown`, `latex`) share one set of formatted cells; `table` and
`markdown` add a table of what pairing gains per comparison. Machine formats (`csv`, `parquet`) share one
flat record per row, with `setting` spread into `dataset` and `depth`, the paper's figure split into
`paper` (a number, or empty) and `paper_fail` (the paper reports "fail"), and `sequential` spread into
`look`, `looks`, `alpha_spent`, `n_at_stop`, `stopped`.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ablations.spec import excerpt

from . import DEFAULT_DESIGN
from .stats import summary

FORMATS = ("table", "markdown", "csv", "json", "latex", "parquet")
MISSING = "–"
FLAT_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("depth", pa.int64()), ("variant", pa.string()), ("n", pa.int64()),
    ("failed", pa.int64()), *[(k, pa.float64()) for k in ("mean", "std", "median", "min", "max", "ci_low", "ci_high",
                                                          "delta", "delta_ci_low", "delta_ci_high", "p_value",
                                                          "p_holm", "effect_size", "p_improve")],
    ("decision", pa.string()), ("paper", pa.float64()), ("paper_fail", pa.bool_()), ("seeds", pa.list_(pa.int64())),
    ("paper_reference", pa.float64()), ("paper_reference_fail", pa.bool_()), ("paper_reference_setting", pa.string()),
    ("test_size", pa.int64()), ("test_se", pa.float64()), ("pairs", pa.int64()),
    ("unpaired_seeds", pa.list_(pa.int64())),
    *[(k, pa.float64()) for k in ("pair_pearson", "pair_spearman", "pair_var_diff", "pair_var_sum", "pair_efficiency")],
    ("look", pa.int64()), ("looks", pa.int64()), ("alpha_spent", pa.float64()), ("n_at_stop", pa.int64()),
    ("stopped", pa.string()), ("precision", pa.string()),
])
SEQUENTIAL_FIELDS = ("look", "looks", "alpha_spent", "n_at_stop", "stopped")
LIST_FIELDS = ("seeds", "unpaired_seeds")
SUMMARY_HEADERS = ["variant", "settings", "mean rank", "wins", "ties", "losses"]   # rank 1 = lowest; vs the baseline
PAIRING_HEADERS = ["setting", "variant", "pairs", "unpaired", "r", "ρ (Spearman)", "var(d)", "var₁+var₂",
                   "efficiency"]
DESIGN_TEXT = {"paired": "Δ paired by seed", "welch": "Δ by Welch's t"}
DECISION_STYLES = {"baseline": "bold", "better": "green", "worse": "red", "equivalent": "cyan", "undecided": "dim"}


def document(grid: str, metric: str, rows: list[dict[str, Any]], alpha: float = 0.05, design: str = DEFAULT_DESIGN,
             sequential: dict[str, Any] | None = None) -> dict[str, Any]:
    """The comparison document: what `compare --format json` prints and what `render` takes."""
    return {"grid": grid, "metric": metric, "alpha": alpha, "design": design, "sequential": sequential,
            "rows": rows, "summary": summary(rows)}


def render(doc: dict[str, Any], fmt: str) -> str | bytes:
    """The document in one of FORMATS; `parquet` gives bytes, every other format text."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {excerpt(fmt)}; choose one of: {', '.join(FORMATS)}")
    return _RENDERERS[fmt](_complete(doc))


def write(doc: dict[str, Any], fmt: str, path: str | Path) -> None:
    """`render` into a file (`compare -o FILE`): bytes as they are, text UTF-8 with a final newline."""
    out = render(doc, fmt)
    if isinstance(out, bytes):
        Path(path).write_bytes(out)
    else:
        Path(path).write_text(out if out.endswith("\n") else out + "\n", encoding="utf-8")


NARROW_HIDDEN = ("setting", "95% CI", "test SE", "g", "P(impr)")  # what a narrow terminal drops (settings: rows)


def print_table(doc: dict[str, Any], console: Console) -> None:
    """The comparison and the across-settings summary as rich tables, decisions coloured. On a terminal too
    narrow for every column, each setting heads its rows instead of filling a column, the CI of the mean,
    g and P(improvement) are left out, and the caption says so."""
    doc = _complete(doc)
    headers = _headers(doc)
    table = _comparison_table(doc, headers)
    if console.measure(table, options=console.options.update_width(10_000)).maximum > console.width:
        table = _comparison_table(doc, [h for h in headers if not h.endswith(NARROW_HIDDEN)])
        table.caption = ("narrow terminal: the CI of the mean, test SE, g and P(impr) left out "
                         "(--format markdown has all)")
        table.caption_justify = "left"
    console.print(table)
    pairing = _pairing(doc)
    if pairing:
        paired = Table(title="Pairing by seed: what it gains (efficiency = var₁+var₂ / var(d))",
                       title_justify="left")
        for i, h in enumerate(PAIRING_HEADERS):
            paired.add_column(h, justify="left" if i < 2 else "right", overflow="fold")
        for cells in pairing:
            paired.add_row(*map(Text, cells))
        console.print(paired)
    rows = _summary(doc)
    if rows:
        across = Table(title="Across settings", title_justify="left")
        for i, h in enumerate(SUMMARY_HEADERS):
            across.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for cells in rows:
            across.add_row(*map(Text, cells))
        console.print(across)


def _comparison_table(doc: dict[str, Any], headers: list[str]) -> Table:
    table = Table(title=_title(doc), title_justify="left")
    for i, h in enumerate(headers):
        short = h in ("n", "failed", "p_holm", "g", "P(impr)", "decision")  # never squeezed; the rest may wrap
        width = len(h) if short else max((len(r["variant"]) for r in doc["rows"]), default=0) if h == "variant" else None
        table.add_column(h, justify="left" if i < 2 or h == "decision" else "right", no_wrap=short,
                         min_width=width, overflow="fold")
    every = _headers(doc)
    previous = None
    for row in doc["rows"]:
        cells = dict(zip(every, _cells(row, doc)))
        if row["setting"] != previous:
            if previous is not None:
                table.add_section()
            if "setting" not in headers:
                table.add_row(Text(cells["setting"], style="bold"), *[""] * (len(headers) - 1))
        previous = row["setting"]
        table.add_row(*(Text(cells[h], style=DECISION_STYLES[row["decision"]] if h == "decision" else "")
                        for h in headers))
    return table


# --- shared cells ------------------------------------------------------------------------------------

def _complete(doc: dict[str, Any]) -> dict[str, Any]:
    """A document from elsewhere (an older JSON, a hand-built dict) with `alpha`, `design`, `sequential` and
    `summary` filled in (an older document does not say its design: none is claimed)."""
    return {"grid": doc["grid"], "metric": doc["metric"], "alpha": 0.05, "design": None, "sequential": None, **doc,
            "summary": doc["summary"] if doc.get("summary") is not None else summary(doc["rows"])}


def _title(doc: dict[str, Any]) -> str:
    notes = ["lower is better"]
    if doc.get("design"):
        notes.append(DESIGN_TEXT[doc["design"]])
    precisions = {r.get("precision") for r in doc["rows"]} - {None}
    if any(p.startswith("mixed") for p in precisions):
        notes.append("†: the cell's runs trained in different precisions (--format json says which)")
    elif precisions:
        notes.append(f"trained in {', '.join(sorted(precisions))}")
    plan = doc.get("sequential")
    if plan:
        notes.append(f"decisions of the sequential plan: {len(plan['looks'])} looks up to {plan['looks'][-1]} seeds, "
                     f"α {plan['alpha']:g}, margin ±{plan['margin']:g} (decision @look/looks; Δ CI at the level "
                     f"of that look)")
    return f"{doc['grid']}: {doc['metric']} ({'; '.join(notes)})"


def _headers(doc: dict[str, Any]) -> list[str]:
    level = round(100 * (1 - doc["alpha"]))
    return ["setting", "variant", "n", "failed", "mean ± std", "test SE", f"{level}% CI", "Δ [CI]", "p_holm", "g",
            "P(impr)", "decision", "paper"]


def _cells(row: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    digits = 2 if doc["metric"].endswith("_error") else 4   # errors are percentages, shown as the paper does

    def num(x: float | None, signed: bool = False) -> str:
        return MISSING if x is None else f"{x:{'+' if signed else ''}.{digits}f}"

    spread = num(row["mean"]) + ("" if row["std"] is None else f" ± {num(row['std'])}")
    ci = MISSING if row["ci_low"] is None else f"[{num(row['ci_low'])}, {num(row['ci_high'])}]"
    delta = num(row["delta"], signed=True)
    if row["delta_ci_low"] is not None:
        delta += f" [{num(row['delta_ci_low'], True)}, {num(row['delta_ci_high'], True)}]"
    p = row["p_holm"]
    p_text = MISSING if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"
    g = MISSING if row["effect_size"] is None else f"{row['effect_size']:+.2f}"
    improve = MISSING if row["p_improve"] is None else f"{row['p_improve']:.2f}"
    paper, reference = row["paper"], row.get("paper_reference")
    paper_text = MISSING if paper is None else paper if isinstance(paper, str) else f"{paper:.2f}"
    if paper is None and reference is not None:  # a stand-in setting's figure, always labelled with its setting
        paper_text = (reference if isinstance(reference, str) else f"{reference:.2f}") + \
            f" ({row['paper_reference_setting']})"
    decision = row["decision"]
    if row.get("sequential") and row["sequential"]["look"]:
        decision += f" @{row['sequential']['look']}/{row['sequential']['looks']}"
    variant = row["variant"] + (" †" if (row.get("precision") or "").startswith("mixed") else "")
    return [_setting(row), variant, str(row["n"]), str(row["failed"]), spread, num(row.get("test_se")), ci,
            delta, p_text, g, improve, decision, paper_text]


def _setting(row: dict[str, Any]) -> str:
    return f"{row['setting']['dataset']} ResNet-{row['setting']['depth']}"


def _pairing(doc: dict[str, Any]) -> list[list[str]]:
    """One line per comparison: what pairing by seed gains over independent samples there."""
    digits = 2 if doc["metric"].endswith("_error") else 4

    def num(x: float | None, fmt: str) -> str:
        return MISSING if x is None else f"{x:{fmt}}"

    return [[_setting(r), r["variant"], str(r["pairs"]), " ".join(map(str, r.get("unpaired_seeds") or [])) or MISSING,
             num(r.get("pair_pearson"), "+.2f"), num(r.get("pair_spearman"), "+.2f"),
             num(r.get("pair_var_diff"), f".{digits + 1}f"), num(r.get("pair_var_sum"), f".{digits + 1}f"),
             num(r.get("pair_efficiency"), ".2f")]
            for r in doc["rows"] if r.get("pairs") is not None]


def _summary(doc: dict[str, Any]) -> list[list[str]]:
    def text(x: Any) -> str:
        return MISSING if x is None else str(x)

    return [[e["variant"], str(e["settings"]), MISSING if e["mean_rank"] is None else f"{e['mean_rank']:.2f}",
             text(e["wins"]), text(e["ties"]), text(e["losses"])] for e in doc["summary"]]


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    paper, reference = row["paper"], row.get("paper_reference")
    plan = row.get("sequential") or {}
    return {**row["setting"], **{k: row[k] for k in FLAT_SCHEMA.names if k in row and k not in ("paper", "paper_reference")},
            **{k: plan.get(k) for k in SEQUENTIAL_FIELDS}, "unpaired_seeds": row.get("unpaired_seeds") or [],
            "paper": None if paper is None or isinstance(paper, str) else float(paper),
            "paper_fail": paper == "fail",
            "paper_reference": None if reference is None or isinstance(reference, str) else float(reference),
            "paper_reference_fail": reference == "fail", "paper_reference_setting": row.get("paper_reference_setting")}


# --- formats -----------------------------------------------------------------------------------------

def _table(doc: dict[str, Any]) -> str:
    buffer = io.StringIO()
    print_table(doc, Console(file=buffer, width=400, color_system=None, highlight=False))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


def _markdown(doc: dict[str, Any]) -> str:
    def lines(headers: list[str], rows: list[list[str]], right_from: int) -> list[str]:
        align = ["---" if i < right_from or h == "decision" else "---:" for i, h in enumerate(headers)]
        return ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in [headers, align, *rows]]

    grid, notes = _title(doc).split(": ", 1)
    out = [f"**{grid}**: {notes}", "", *lines(_headers(doc), [_cells(r, doc) for r in doc["rows"]], right_from=2)]
    pairing = _pairing(doc)
    if pairing:
        out += ["", "Pairing by seed (efficiency = var₁+var₂ / var(d): how many times the seeds independent "
                "samples would need for the same CI):", "", *lines(PAIRING_HEADERS, pairing, right_from=2)]
    rows = _summary(doc)
    if rows:
        out += ["", "Across settings (rank 1 = lowest; wins/ties/losses against the baseline):", "",
                *lines(SUMMARY_HEADERS, rows, right_from=1)]
    return "\n".join(out) + "\n"


def _csv(doc: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FLAT_SCHEMA.names, lineterminator="\n")
    writer.writeheader()
    for row in doc["rows"]:
        flat = _flat(row)
        writer.writerow({**flat, **{k: " ".join(map(str, flat[k])) for k in LIST_FIELDS}})
    return buffer.getvalue()


def _json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False)


_TEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "<": r"$<$", "Δ": r"$\Delta$", MISSING: "--"}


def _tex(text: str) -> str:
    return "".join(_TEX_SPECIALS.get(ch, ch) for ch in text)


def _latex(doc: dict[str, Any]) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}), a rule between settings."""
    headers = _headers(doc)
    spec = "".join("l" if i < 2 or h == "decision" else "r" for i, h in enumerate(headers))
    out = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(map(_tex, headers)) + r" \\", r"\midrule"]
    previous = None
    for row in doc["rows"]:
        if previous is not None and row["setting"] != previous:
            out.append(r"\midrule")
        previous = row["setting"]
        out.append(" & ".join(map(_tex, _cells(row, doc))) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def _parquet(doc: dict[str, Any]) -> bytes:
    table = pa.Table.from_pylist([_flat(r) for r in doc["rows"]], schema=FLAT_SCHEMA)
    table = table.replace_schema_metadata({"ablate.grid": str(doc["grid"]), "ablate.metric": doc["metric"]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


_RENDERERS = {"table": _table, "markdown": _markdown, "csv": _csv, "json": _json, "latex": _latex,
              "parquet": _parquet}
