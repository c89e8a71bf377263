"""`ablate run / status / cancel / compare / grids` through the real command line, embedded defaults."""
from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest

from tests.helpers import ablate, alias_bomb

SMOKE = {"name": "cli-smoke", "dataset": "synthetic", "subset": 512, "recipe": "smoke", "depths": [8],
         "block": "basic", "width": 4, "variants": ["original", "full_preact"], "seeds": 2}


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    env = {"ABLATE_HOME": str(root / "home"), "MLFLOW_TRACKING_URI": "", "ABLATE_STATE_URL": "", "RAY_ADDRESS": ""}
    grid_file = root / "grid.yaml"
    grid_file.write_text(json.dumps(SMOKE))
    run = ablate("run", str(grid_file), "--json", env=env)
    assert run.code == 0, run.err
    return env, grid_file, run.json


def test_run_json_contract(finished_grid):
    _, _, out = finished_grid
    assert (out["trials"], out["executed"], out["reused"]) == (4, 4, 0)
    rows = out["comparison"]["rows"]
    assert [r["variant"] for r in rows] == ["original", "full_preact"]
    assert rows[0]["decision"] == "baseline" and all(r["n"] == 2 for r in rows)
    assert out["tracking_uri"].startswith("sqlite:")


def test_rerun_reuses_everything(finished_grid):
    env, grid_file, first = finished_grid
    again = ablate("run", str(grid_file), "--json", env=env)
    assert again.code == 0 and (again.json["executed"], again.json["reused"]) == (0, 4)
    assert again.json["grid"] == first["grid"]


def test_status_by_name_and_all(finished_grid):
    env, _, out = finished_grid
    one = ablate("status", "cli-smoke", "--json", env=env).json
    assert one["grid"] == out["grid"] and one["finished"] == 4 and one["queued"] == 0
    every = ablate("status", "--json", env=env).json
    assert out["grid"] in [g["id"] for g in every["grids"]]
    text = ablate("status", env={**env, "COLUMNS": "200"}).out  # a table of grids, a row each
    row = next(line for line in text.splitlines() if out["grid"] in line)
    assert row.split("│")[1].strip() == "cli-smoke" and row.split("│")[5].strip() == "4", text


@pytest.mark.parametrize("fmt", ["table", "markdown", "latex", "csv"])
def test_compare_text_formats(finished_grid, fmt):
    env, _, out = finished_grid
    r = ablate("compare", out["grid"], "--format", fmt, env=env)
    assert r.code == 0, r.err
    assert "full_preact" in r.out or "full\\_preact" in r.out
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(r.out)))
        assert [row["variant"] for row in rows] == ["original", "full_preact"] and rows[0]["n"] == "2"


def test_compare_json_and_parquet(finished_grid, tmp_path):
    env, _, out = finished_grid
    doc = ablate("compare", out["grid"], "--json", env=env).json
    assert doc["grid"] == out["grid"] and doc["metric"] == "test_error" and len(doc["rows"]) == 2
    assert set(doc["rows"][1]) >= {"setting", "variant", "n", "failed", "mean", "std", "median", "ci_low", "ci_high",
                                   "delta", "delta_ci_low", "delta_ci_high", "p_value", "p_holm", "effect_size",
                                   "p_improve", "decision", "paper"}
    target = tmp_path / "t.parquet"
    r = ablate("compare", out["grid"], "--format", "parquet", "-o", str(target), env=env)
    assert r.code == 0, r.err
    assert pq.read_table(target).num_rows == 2
    by_loss = ablate("compare", out["grid"], "--metric", "train_loss", "--baseline", "full_preact", "--json", env=env)
    assert by_loss.json["rows"][0]["variant"] == "original" and by_loss.json["metric"] == "train_loss"


def test_cancel_a_finished_grid_changes_no_result(finished_grid):
    env, _, out = finished_grid
    r = ablate("cancel", out["grid"], "--json", env=env)
    assert r.code == 0 and r.json["cancelled_queued"] == 0 and r.json["finished"] == 4


@pytest.mark.parametrize("args,needle", [
    (["compare", "no-such-grid"], "no grid 'no-such-grid'"),
    (["compare", "cli-smoke", "--format", "pdf"], "unknown format 'pdf'"),
    (["compare", "cli-smoke", "--format", "parquet"], "needs -o FILE"),
    (["compare", "cli-smoke", "--baseline", "nope"], "baseline 'nope' is not a variant"),
    (["status", "nope"], "no grid 'nope'"),
    (["cancel", "nope"], "no grid 'nope'"),
    (["run", "missing.yaml"], "does not exist"),
    (["run", "table9"], "neither a grid file nor a bundled grid"),
])
def test_bad_input_exit_2(finished_grid, args, needle):
    env, _, _ = finished_grid
    r = ablate(*args, "--json", env=env)
    assert r.code == 2, (r.out, r.err)
    assert needle in r.json["error"] and "Traceback" not in r.err


def test_bad_grid_file_exit_2_and_state_untouched(finished_grid, tmp_path):
    env, _, out = finished_grid
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: cli-smoke\ndataset: synthetic\ndepths: [8]\nvariants: [original, nope]\nseeds: 2\n")
    r = ablate("run", str(bad), "--json", env=env)
    assert r.code == 2 and "unknown variant 'nope'" in r.json["error"]
    assert ablate("status", out["grid"], "--json", env=env).json["finished"] == 4


def test_an_alias_bomb_file_is_one_short_line_and_exit_2(tmp_path):
    """`ablate run` and `ablate tune` read files through the same bounded reader as the service: before,
    `ablate run` printed the whole expanded value, hundreds of megabytes."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    for command in ("run", "tune"):
        r = ablate(command, str(bomb), "--json", env={"ABLATE_HOME": str(tmp_path / "home")})
        assert r.code == 2 and "once its aliases are expanded" in r.json["error"], r.err[-2000:]
        assert len(r.out) + len(r.err) < 1000


def test_grids_lists_the_paper_tables():
    out = ablate("grids", "--json").json
    by_name = {g["name"]: g for g in out["grids"]}
    assert by_name["table2"]["trials"] == 50 and by_name["table1"]["trials"] == 55
    assert by_name["mini-table2"]["dataset"] == "fashion-mnist"
    assert by_name["table5"]["dataset"] == "imagenet" and by_name["table5"]["trials"] == 4
    assert by_name["table5"]["recipe"] == "paper-imagenet" and by_name["table3-1layer"]["trials"] == 10
    # Without --json, a table a person reads: a row per grid, no Python dict dump.
    text = ablate("grids", env={"COLUMNS": "250"}).out
    assert "{'" not in text and "'name'" not in text
    rows = [line for line in text.splitlines() if line.startswith("│ table5 ")]
    assert len(rows) == 1 and "imagenet" in rows[0] and "paper-imagenet" in rows[0], text[-3000:]
