"""dashboards.tables: every output format of `ablate compare` renders and reads back."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from dashboards.stats import compare
from dashboards.tables import FORMATS, document, print_table, render, write
from tests.helpers import ROOT, ablate

BASE = [6.61, 6.72, 6.48, 6.90, 6.55]


def trials(variant, values, depth=110, status="finished"):
    return [dict(dataset="cifar10", depth=depth, variant=variant, seed=i, status=status, test_error=v,
                 train_loss=0.1, train_error=1.0) for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def doc():
    results = (trials("original", BASE) + trials("full_preact", [5.9, 6.0, 5.8, 6.1, 5.95])
               + trials("bn_after_add", [8.1, 8.3, 7.9, 8.2, 8.0]) + trials("scale-0", [81.0, 90.0], status="diverged")
               + trials("original", BASE, depth=20) + trials("full_preact", [6.6], depth=20))
    rows = compare(results, "original", variant_order=["original", "bn_after_add", "full_preact", "scale-0"])
    return document("table2-0123abcd", "test_error", rows)


def test_a_narrow_terminal_gets_settings_as_rows_and_fewer_columns_never_squeezed_cells(doc):
    console = Console(record=True, width=80)
    print_table(doc, console)
    text = console.export_text()
    table, caption = text.split("narrow terminal")
    assert "P(impr)" not in table and "95% CI" not in table and "left out" in caption
    assert "ResNet-110" in table and "bn_after_add" in table and "full_preact" in table and "…" not in table
    assert max(len(line) for line in text.splitlines()) <= 80
    wide = Console(record=True, width=250)
    print_table(doc, wide)
    text = wide.export_text()
    assert "narrow terminal" not in text and "P(impr)" in text


def test_document_carries_the_contract_keys(doc):
    assert list(doc) == ["grid", "metric", "alpha", "design", "sequential", "rows", "summary"]
    assert doc["design"] == "welch" and doc["sequential"] is None
    assert [s["variant"] for s in doc["summary"]] == ["original", "full_preact", "bn_after_add", "scale-0"]


def test_table_shows_every_column_and_the_paper_figure(doc):
    text = render(doc, "table")
    assert isinstance(text, str) and "\x1b[" not in text
    for word in ("setting", "variant", "failed", "mean ± std", "95% CI", "Δ [CI]", "p_holm", "P(impr)", "decision",
                 "paper", "cifar10 ResNet-110", "bn_after_add", "better", "worse", "baseline", "fail", "6.37",
                 "Across settings", "mean rank"):
        assert word in text
    console = Console(record=True, width=250, force_terminal=True)
    print_table(doc, console)
    assert "full_preact" in console.export_text(clear=False) and "\x1b[" in console.export_text(styles=True)


def test_markdown_has_a_header_row_and_one_line_per_cell(doc):
    lines = render(doc, "markdown").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| setting"))
    assert lines[header].split(" | ")[:3] == ["| setting", "variant", "n"]
    assert set(lines[header + 1]) <= set("|-: ")
    body = lines[header + 2: header + 2 + len(doc["rows"])]
    assert all(line.startswith("| cifar10 ResNet-") for line in body)
    assert "| scale-0 |" in body[5] and body[5].endswith("| fail |")   # depth 20 sorts first: 2 rows
    assert any(line.startswith("| variant | settings | mean rank") for line in lines)


def test_csv_parses_back_to_the_same_numbers(doc):
    parsed = list(csv.DictReader(io.StringIO(render(doc, "csv"))))
    assert len(parsed) == len(doc["rows"])
    for got, row in zip(parsed, doc["rows"]):
        assert (got["dataset"], int(got["depth"]), got["variant"]) == (
            row["setting"]["dataset"], row["setting"]["depth"], row["variant"])
        assert int(got["n"]) == row["n"] and int(got["failed"]) == row["failed"]
        assert float(got["mean"]) == row["mean"]
        assert got["p_holm"] == ("" if row["p_holm"] is None else repr(row["p_holm"]))
        assert got["seeds"].split() == [str(s) for s in row["seeds"]]
    scale = parsed[5]
    assert scale["variant"] == "scale-0" and scale["paper"] == "" and scale["paper_fail"] == "True"
    assert float(parsed[4]["paper"]) == 6.37 and parsed[4]["paper_fail"] == "False"


def test_latex_is_a_booktabs_tabular_with_escapes(doc):
    tex = render(doc, "latex")
    lines = tex.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{") and lines[1] == r"\toprule" and lines[-1] == r"\end{tabular}"
    assert r"\midrule" in lines and r"\bottomrule" in lines
    assert r"bn\_after\_add" in tex and r"p\_holm" in tex and r"95\% CI" in tex and r"$\pm$" in tex
    assert "_" not in tex.replace(r"\_", "") and "%" not in tex.replace(r"\%", "")
    assert sum(line.endswith(r"\\") for line in lines) == len(doc["rows"]) + 1
    odd = compare(trials("base", BASE) + trials("a_b&c%#$", BASE), "base")
    odd_tex = render(document("g", "test_error", odd), "latex")
    assert r"a\_b\&c\%\#\$" in odd_tex


def test_parquet_reads_back_flat(doc, tmp_path):
    data = render(doc, "parquet")
    assert isinstance(data, bytes)
    table = pq.read_table(io.BytesIO(data))
    assert table.column_names[:3] == ["dataset", "depth", "variant"]
    assert table.column("n").to_pylist() == [r["n"] for r in doc["rows"]]
    assert table.column("mean").to_pylist() == [r["mean"] for r in doc["rows"]]
    assert table.column("seeds").to_pylist() == [r["seeds"] for r in doc["rows"]]
    assert table.column("paper_fail").to_pylist()[5] is True
    assert table.schema.metadata[b"ablate.grid"] == b"table2-0123abcd"
    write(doc, "parquet", tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").equals(table)


def test_json_round_trips(doc, tmp_path):
    assert json.loads(render(doc, "json")) == doc
    without = {k: v for k, v in doc.items() if k not in ("summary", "alpha")}
    assert json.loads(render(without, "json")) == doc   # summary computed, alpha defaulted
    write(doc, "json", tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == doc


def test_every_format_renders_an_empty_table_and_unknown_formats_are_refused():
    empty = document("g", "test_error", [])
    for fmt in FORMATS:
        assert render(empty, fmt)
    with pytest.raises(ValueError, match="markdown"):
        render(empty, "html")


def test_interval_label_follows_alpha_and_losses_get_more_digits():
    rows = compare(trials("original", BASE) + trials("v", [6.0, 6.1, 5.9]), "original", metric="train_loss",
                   alpha=0.1)
    text = render(document("g", "train_loss", rows, alpha=0.1), "markdown")
    assert "90% CI" in text and "0.1000" in text


# --- the sequential plan's decisions, pairing, and every format on standard output ------------------------

def sequential_doc():
    from dashboards.sequential import overlay
    results = trials("original", BASE) + trials("full_preact", [5.9, 6.0, 5.8, 6.1, 5.95]) \
        + trials("bn_after_add", [6.7, 6.6, 6.5, 6.8, 6.6])
    rows = compare(results, "original", variant_order=["original", "bn_after_add", "full_preact"])
    plan = {"looks": [3, 5], "alpha": 0.05, "margin": 0.2, "beta": 0.2, "baseline": "original",
            "metric": "test_error"}
    record = {"n": 3, "delta": -0.62, "sd": 0.1, "p_value": 0.004, "level": 0.006, "share": 0.5,
              "alpha_spent": 0.0041, "ci_low": -0.9, "ci_high": -0.35, "decision": "better", "stopped": "efficacy"}
    still = {**record, "delta": 0.01, "p_value": 0.8, "ci_low": -0.5, "ci_high": 0.5, "decision": "undecided",
             "stopped": None, "share": 1.0}
    last = {**still, "n": 5, "stopped": "max_seeds", "alpha_spent": 0.05}
    looks = [{("cifar10", 110, "full_preact"): record, ("cifar10", 110, "bn_after_add"): still},
             {("cifar10", 110, "bn_after_add"): last}]
    overlay(rows, plan, looks)
    return document("g", "test_error", rows, sequential=plan)


def test_a_sequential_grid_shows_the_plans_decisions_with_look_and_alpha_spent():
    doc = sequential_doc()
    by = {r["variant"]: r for r in doc["rows"]}
    full = by["full_preact"]
    assert full["decision"] == "better" and full["p_holm"] is None and full["delta"] == -0.62
    assert (full["delta_ci_low"], full["delta_ci_high"]) == (-0.9, -0.35)
    assert full["sequential"] == {"look": 1, "looks": 2, "pairs": 3, "alpha_spent": 0.0041, "level": 0.006,
                                  "share": 0.5, "n_at_stop": 3, "stopped": "efficacy"}
    assert by["bn_after_add"]["sequential"]["stopped"] == "max_seeds" and by["bn_after_add"]["decision"] == "undecided"
    text = render(doc, "markdown")
    assert "better @1/2" in text and "undecided @2/2" in text and "decisions of the sequential plan" in text
    flat = list(csv.DictReader(io.StringIO(render(doc, "csv"))))
    assert flat[2]["look"] == "1" and flat[2]["stopped"] == "efficacy" and flat[2]["alpha_spent"] == "0.0041"
    assert flat[0]["look"] == ""   # the baseline has no plan of its own
    assert [s["wins"] for s in doc["summary"] if s["variant"] == "full_preact"] == [1]


def test_pairing_table_and_test_se_in_the_human_formats(doc):
    text = render(doc, "markdown")
    assert "| setting | variant | pairs | unpaired |" in text and "test SE" in text and "Δ by Welch's t" in text
    full = next(r for r in doc["rows"] if r["variant"] == "full_preact" and r["setting"]["depth"] == 110)
    assert f"{full['test_se']:.2f}" in text and f"{full['pair_efficiency']:.2f}" in text
    paired = document("g", "test_error", doc["rows"], design="paired")
    assert "Δ paired by seed" in render(paired, "table")


@pytest.fixture(scope="module")
def stored_grid(tmp_path_factory):
    """A grid with results in a state store, written through the store's API (no training)."""
    from orchestrator.grids import expand_grid, load_grid
    from orchestrator.state import StateStore
    home = tmp_path_factory.mktemp("tables") / "home"
    spec = load_grid({"name": "formats", "dataset": "synthetic", "recipe": "smoke", "depths": [8], "block": "basic",
                      "width": 4, "variants": ["original", "full_preact"], "seeds": 4})
    store = StateStore(f"sqlite:///{home / 'state.db'}")
    grid_trials = expand_grid(spec)
    store.register_grid(spec.grid_id({}), spec.name, spec.model_dump(mode="json", by_alias=True), grid_trials)
    for t in grid_trials:
        store.claim(t.key, "test")
        store.finish(t.key, "test", {"status": "finished", "test_error": 10.0 + t.seed / 10 - (t.variant == "original"),
                                     "train_loss": 0.5, "train_error": 5.0, "history": [], "test_size": 500})
    return {"ABLATE_HOME": str(home)}


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "table"])
def test_every_format_means_that_format_on_standard_output(stored_grid, fmt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "compare", "formats", "--format", fmt],
                          capture_output=True, cwd=ROOT, env={**os.environ, **stored_grid})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    if fmt == "json":
        doc = json.loads(out)
        assert doc["design"] == "welch" and [r["variant"] for r in doc["rows"]] == ["original", "full_preact"]
        assert doc["rows"][0]["test_size"] == 500   # read from the result record
    elif fmt == "parquet":
        assert pq.read_table(io.BytesIO(out)).num_rows == 2
    elif fmt == "csv":
        assert [r["variant"] for r in csv.DictReader(io.StringIO(out.decode()))] == ["original", "full_preact"]
    else:
        assert b"full" in out and not out.lstrip().startswith(b"{")
    target = tmp_path / f"out.{fmt}"   # -o FILE gets the same bytes
    written = ablate("compare", "formats", "--format", fmt, "-o", str(target), "--json", env=stored_grid)
    assert written.code == 0 and written.json == {"written": str(target)}
    assert target.read_bytes() == out


def test_a_cell_that_mixes_precisions_says_so():
    rows = [{"dataset": "cifar10", "depth": 20, "variant": v, "seed": s, "status": "finished",
             "test_error": 10.0 + s + (v == "b"), "train_loss": 0.1, "train_error": 1.0, "test_size": 10000,
             "precision": "bf16" if (v, s) == ("b", 2) else "fp32"} for v in ("a", "b") for s in range(4)]
    doc = document("g", "test_error", compare(rows, baseline="a"))
    assert [r["precision"] for r in doc["rows"]] == ["fp32", "mixed (bf16 ×1, fp32 ×3)"]
    text = render(doc, "table")
    assert "b †" in text and "†: the cell's runs trained in different precisions" in text
    plain = document("g", "test_error", compare([dict(r, precision="fp32") for r in rows], baseline="a"))
    assert "trained in fp32" in render(plain, "markdown") and "†" not in render(plain, "markdown")
