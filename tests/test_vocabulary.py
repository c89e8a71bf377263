"""One vocabulary (ablations/vocabulary.py): every entry point judges a data folder by the same check, and the
layers that name statuses and metrics name the ones defined there."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
from fastapi.testclient import TestClient

from ablations.vocabulary import METRICS, STATUSES, check_data_dir
from orchestrator.cli import build_parser, main

GRID = {"name": "dirs", "dataset": "synthetic", "subset": 256, "recipe": "smoke", "depths": [8], "block": "basic",
        "width": 4, "variants": ["original"], "seeds": 1}
TUNE = {"name": "dirs", "dataset": "synthetic", "subset": 256, "depth": 8, "block": "basic", "width": 4,
        "base": "smoke", "space": {"lr": {"low": 0.01, "high": 0.1}}, "n_trials": 1}
BAD_DIRS = ["relative/data", "../data", "/data/../etc", "/data/\x00x", "", "~/data"]


def reason(data_dir: str) -> str:
    with pytest.raises(ValueError) as info:
        check_data_dir(data_dir)
    return str(info.value)


def cli(*args: str) -> tuple[int, dict]:
    """`ablate ARGS --json` in this process (argv cannot carry a NUL byte to a subprocess)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--json"])
    return code, json.loads(out.getvalue())


@pytest.mark.parametrize("data_dir", BAD_DIRS)
def test_every_entry_point_rejects_a_bad_data_dir_alike(data_dir, tmp_path, ablate_home):
    from orchestrator.api import create_app
    from orchestrator.grids import GridError, load_grid
    from orchestrator.service import GridService
    from orchestrator.state import StateStore
    from orchestrator.tracking import Tracker
    from orchestrator.tuning.spec import TuneError, load_tune_spec

    expected = reason(data_dir)
    assert "\n" not in expected and "data_dir" in expected
    with pytest.raises(GridError) as grid:
        load_grid({**GRID, "data_dir": data_dir})
    with pytest.raises(TuneError) as tune:
        load_tune_spec({**TUNE, "data_dir": data_dir})
    assert str(grid.value) == str(tune.value) == f"data_dir: {expected}"

    grid_file, tune_file = tmp_path / "grid.json", tmp_path / "tune.json"
    grid_file.write_text(json.dumps({**GRID, "data_dir": data_dir}))
    tune_file.write_text(json.dumps({**TUNE, "data_dir": data_dir}))
    for args in (("run", str(grid_file)), ("submit", str(grid_file)), ("tune", str(tune_file))):
        assert cli(*args) == (2, {"error": f"data_dir: {expected}"}), args
    train = ("train", "--depth", "8", "--block", "basic", "--dataset", "synthetic", "--data-dir", data_dir)
    assert cli(*train) == (2, {"error": expected})

    client = TestClient(create_app(GridService(store=StateStore(), tracker=Tracker())))
    r = client.post("/grids", content=json.dumps({**GRID, "data_dir": data_dir}))
    assert r.status_code == 422 and r.json()["detail"] == f"data_dir: {expected}"


def test_the_reasons_say_what_is_wrong():
    assert "NUL" in reason("/data/\x00x")
    assert "absolute path" in reason("relative/data") and "'..'" in reason("/data/../etc")
    assert check_data_dir("/srv/datasets/cifar-10 (copy)") == "/srv/datasets/cifar-10 (copy)"


def test_the_cli_the_api_and_the_store_use_the_vocabulary(ablate_home):
    from orchestrator.api import create_app
    from orchestrator.service import GridService
    from orchestrator.state import StateStore
    from orchestrator.tracking import Tracker

    compare = build_parser()._subparsers._group_actions[0].choices["compare"]
    [metric] = [a for a in compare._actions if a.dest == "metric"]
    assert tuple(metric.choices) == METRICS
    client = TestClient(create_app(GridService(store=StateStore(), tracker=Tracker())))
    query = client.get("/openapi.json").json()["paths"]["/grids/{grid_id}/comparison"]["get"]["parameters"]
    assert tuple(next(p for p in query if p["name"] == "metric")["schema"]["enum"]) == METRICS
    grid_id = client.post("/grids", content=json.dumps(GRID)).json()["id"]
    status = client.get(f"/grids/{grid_id}").json()
    assert set(STATUSES) <= set(status) and status["queued"] == 1
