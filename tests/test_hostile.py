"""Hostile input: generated grid specs and HTTP bodies never crash the service or corrupt its state."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.api import create_app
from orchestrator.grids import parse_grid_text
from orchestrator.service import GridService
from orchestrator.state import StateStore
from orchestrator.tracking import Tracker

VALID = {"name": "hostile", "dataset": "synthetic", "subset": 256, "recipe": "smoke", "depths": [8],
         "block": "basic", "width": 4, "variants": ["original", "full_preact"], "seeds": 2}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)
ALLOWED = {201, 400, 413, 422}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("hostile")
    store = StateStore(f"sqlite:///{home / 'state.db'}")
    service = GridService(store=store, tracker=Tracker(f"sqlite:///{home / 'mlflow.db'}"))
    return TestClient(create_app(service)), store  # the monitor is not started: nothing trains


def check_state(store: StateStore) -> None:
    """Whatever was accepted is a valid grid whose trials all exist."""
    from workers.trainer import TrialConfig
    for row in store.grids():
        spec = parse_grid_text(row.spec)
        assert spec.grid_id() == row.id
        for trial in store.grid_trials(row.id):
            assert TrialConfig.model_validate_json(trial["config"]).key() == trial["key"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=values)
def test_arbitrary_json_bodies(env, body):
    client, store = env
    r = client.post("/grids", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code in ALLOWED, r.text
    if r.status_code != 201:
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(VALID) + ["resources", "data_dir", "timeout_s", "max_retries", "extra"]),
       value=values)
def test_one_field_of_a_valid_grid_replaced(env, field, value):
    client, store = env
    r = client.post("/grids", content=json.dumps({**VALID, field: value}, allow_nan=True))
    assert r.status_code in ALLOWED, r.text
    check_state(store)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_arbitrary_bytes(env, raw):
    client, store = env
    r = client.post("/grids", content=raw, headers={"content-type": "application/yaml"})
    assert r.status_code in ALLOWED, r.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid_id=st.text(min_size=1, max_size=80))
def test_arbitrary_grid_ids(env, grid_id):
    client, _ = env
    from urllib.parse import quote
    for method, path in (("GET", ""), ("GET", "/comparison"), ("DELETE", "")):
        r = client.request(method, f"/grids/{quote(grid_id, safe='')}{path}")
        assert r.status_code in {404, 405, 422} or (r.status_code == 200 and grid_id.startswith("hostile")), r.text


@pytest.mark.parametrize("change", [{"name": "../../etc"}, {"name": "a/b"}, {"data_dir": "../secrets"},
                                    {"data_dir": "relative/path"}, {"variants": [{"name": "../x"}]}])
def test_path_traversal_is_rejected(env, change):
    client, store = env
    before = len(store.grids())
    r = client.post("/grids", content=json.dumps({**VALID, **change}))
    assert r.status_code == 422 and len(store.grids()) == before


def test_state_survives_the_barrage(env):
    client, store = env
    r = client.post("/grids", content=json.dumps(VALID))
    assert r.status_code == 201
    check_state(store)
    assert client.get(f"/grids/{r.json()['id']}").json()["queued"] == 4
