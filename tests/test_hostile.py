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


def refused_briefly(r) -> None:
    """A refusal is a status we allow with one short line of detail, whatever the body held."""
    assert r.status_code in ALLOWED, r.text[:2000]
    if r.status_code != 201:
        detail = r.json()["detail"]
        assert isinstance(detail, str) and detail and "\n" not in detail and len(detail) < 400, detail[:2000]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=values)
def test_arbitrary_json_bodies(env, body):
    client, store = env
    r = client.post("/grids", content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    refused_briefly(r)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(VALID) + ["resources", "data_dir", "timeout_s", "max_retries", "extra"]),
       value=values)
def test_one_field_of_a_valid_grid_replaced(env, field, value):
    client, store = env
    r = client.post("/grids", content=json.dumps({**VALID, field: value}, allow_nan=True))
    refused_briefly(r)
    check_state(store)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_arbitrary_bytes(env, raw):
    client, store = env
    r = client.post("/grids", content=raw, headers={"content-type": "application/yaml"})
    refused_briefly(r)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(grid_id=st.text(min_size=1, max_size=80))
def test_arbitrary_grid_ids(env, grid_id):
    client, _ = env
    from urllib.parse import quote
    for method, path in (("GET", ""), ("GET", "/comparison"), ("DELETE", "")):
        r = client.request(method, f"/grids/{quote(grid_id, safe='')}{path}")
        assert r.status_code in {404, 405, 422} or (r.status_code == 200 and grid_id.startswith("hostile")), r.text


def yaml_grid(field: str, value: str) -> str:
    """VALID as YAML text with one field's value written out as YAML source."""
    lines = [f"{k}: {json.dumps(v)}" for k, v in VALID.items() if k != field]
    return "\n".join([*lines, f"{field}: {value}"]) + "\n"


FIELDS = st.sampled_from(sorted(VALID) + ["resources", "timeout_s", "max_retries", "baseline"])


@st.composite
def alias_chains(draw) -> str:
    """Anchors that repeat the one before: `fanout ** levels` values in a few hundred bytes."""
    levels, fanout = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    leaf = draw(st.sampled_from(["0", "x", "{a: 1}", "[]", "original"]))
    chain = [f"&a0 {leaf}"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return f"[{', '.join(chain)}]" if draw(st.booleans()) else f"{{{', '.join(f'k{i}: {c}' for i, c in enumerate(chain))}}}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=FIELDS, value=alias_chains())
def test_alias_chains_in_any_field(env, field, value):
    client, store = env
    refused_briefly(client.post("/grids", content=yaml_grid(field, value), headers={"content-type": "application/yaml"}))
    assert client.get("/health").status_code == 200
    check_state(store)


@st.composite
def nested(draw) -> str:
    """Brackets nested up to thousands deep, flow sequences or mappings, closed or not."""
    depth = draw(st.integers(1, 3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ("{a: ", "}"), ('{"a": ', "}")]))
    return opener * depth + draw(st.sampled_from(["1", "", "[]"])) + closer * draw(st.sampled_from([depth, depth // 2]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=FIELDS, value=nested())
def test_deep_nesting_in_any_field(env, field, value):
    client, _ = env
    refused_briefly(client.post("/grids", content=yaml_grid(field, value), headers={"content-type": "application/yaml"}))


# Scalars YAML 1.1 turns into work or into values Python cannot hold: long numbers, base-60 numbers,
# impossible dates, huge exponents.
odd_scalars = st.one_of(
    st.integers(1, 20_000).map(lambda n: "9" * n),
    st.integers(1, 20_000).map(lambda n: ":".join(["59"] * n)),
    st.from_regex(r"\A[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}\Z"),
    st.from_regex(r"\A-?[0-9]\.[0-9]+e[+-]?[0-9]{1,6}\Z"),
    st.sampled_from([".inf", "-.inf", ".nan", "0x" + "f" * 5000, "0b" + "1" * 5000, "0o" + "7" * 3000]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=FIELDS, value=odd_scalars, inside=st.booleans())
def test_odd_scalars_in_any_field(env, field, value, inside):
    client, store = env
    refused_briefly(client.post("/grids", content=yaml_grid(field, f"[{value}]" if inside else value),
                                headers={"content-type": "application/yaml"}))
    check_state(store)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(metric=st.text(max_size=300), baseline=st.one_of(st.none(), st.text(max_size=300)))
def test_arbitrary_comparison_questions(env, metric, baseline):
    client, _ = env
    grid_id = client.post("/grids", content=json.dumps(VALID)).json()["id"]
    r = client.get(f"/grids/{grid_id}/comparison", params={"metric": metric, **({"baseline": baseline}
                                                                               if baseline is not None else {})})
    assert r.status_code in {200, 400, 422}, r.text[:2000]
    assert len(r.content) < 4000  # FastAPI's own 422 echoes a query value, at most as long as the URL


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
