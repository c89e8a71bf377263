"""The HTTP API layer: routes, status codes and details, auth, limits (in-process, no scheduling)."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from orchestrator import api, reporting
from orchestrator.api import MAX_BODY_BYTES, create_app
from orchestrator.service import GridService
from orchestrator.state import StateStore
from orchestrator.tracking import Tracker
from tests.helpers import alias_bomb

GRID_YAML = """
name: api-grid
dataset: synthetic
subset: 256
recipe: smoke
depths: [8]
block: basic
width: 4
variants: [original, full_preact]
seeds: 2
"""


@pytest.fixture
def service(ablate_home):
    return GridService(store=StateStore(), tracker=Tracker())


@pytest.fixture
def client(service):
    return TestClient(create_app(service))


def test_submit_yaml_and_json_then_read_back(client, service):
    r = client.post("/grids", content=GRID_YAML, headers={"content-type": "application/yaml"})
    assert r.status_code == 201, r.text
    grid_id, trials = r.json()["id"], r.json()["trials"]
    assert grid_id.startswith("api-grid-") and trials == 4
    as_json = client.post("/grids", json={"name": "api-grid", "dataset": "synthetic", "subset": 256, "recipe": "smoke",
                                          "depths": [8], "block": "basic", "width": 4,
                                          "variants": ["original", "full_preact"], "seeds": 2})
    assert as_json.status_code == 201 and as_json.json()["id"] == grid_id  # same spec, same grid
    status = client.get(f"/grids/{grid_id}").json()
    assert status["queued"] == 4 and status["name"] == "api-grid"
    assert [g["grid"] for g in client.get("/grids").json()] == [grid_id]
    doc = client.get(f"/grids/{grid_id}/comparison").json()
    assert doc["grid"] == grid_id and [r["n"] for r in doc["rows"]] == [0, 0]
    assert "api-grid" in client.get("/").text
    cancelled = client.delete(f"/grids/{grid_id}").json()
    assert cancelled["grid_cancelled"] is True and cancelled["cancelled"] == cancelled["cancelled_queued"] == 4


@pytest.mark.parametrize("body,code,needle", [
    ("name: x\ndataset: synthetic\ndepths: [8]\nvariants: [nope]\nseeds: 1\n", 422, "unknown variant 'nope'"),
    ("[1, 2", 422, "not valid YAML"),
    ("just text", 422, "a grid is a mapping"),
    ("/etc/passwd", 422, "a grid is a mapping"),
    ("table1", 422, "a grid is a mapping"),  # preset names are for the CLI, not for remote callers
    ("!!python/object/apply:os.system ['true']", 422, "not valid YAML"),
    (json.dumps({"name": "x", "dataset": "synthetic", "depths": [8], "block": "basic", "variants": ["original"],
                 "seeds": 1, "data_dir": "../../etc"}), 422, "absolute path"),
])
def test_bad_grids_answer_4xx_with_detail(client, body, code, needle):
    r = client.post("/grids", content=body, headers={"content-type": "application/yaml"})
    assert r.status_code == code and needle in r.json()["detail"]


def test_limits_and_encoding(client):
    big = "x" * (MAX_BODY_BYTES + 1)
    assert client.post("/grids", content=big).status_code == 413
    assert client.post("/grids", content=b"\xff\xfe\x00").status_code == 400


def test_unknown_grids_and_questions(client):
    assert client.get("/grids/nope").status_code == 404
    assert client.delete("/grids/nope").status_code == 404
    assert client.get("/grids/nope/comparison").status_code == 404
    grid_id = client.post("/grids", content=GRID_YAML).json()["id"]
    r = client.get(f"/grids/{grid_id}/comparison", params={"baseline": "nope"})
    assert r.status_code == 400 and "not a variant" in r.json()["detail"]
    assert client.get(f"/grids/{grid_id}/comparison", params={"metric": "accuracy"}).status_code == 422
    assert client.get(f"/grids/{grid_id}/comparison", params={"metric": "test_error_top5"}).status_code == 200


def test_bearer_token(service):
    client = TestClient(create_app(service, token="s3cret"))
    assert client.get("/health").status_code == 200
    assert client.get("/grids").status_code == 401
    assert client.get("/grids", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/grids", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.post("/grids", content=GRID_YAML).status_code == 401


def test_openapi_documents_the_grid_body(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/grids"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/GridSpec"}
    assert "VariantSpec" in schema["components"]["schemas"]


def test_comparison_design_and_plan_endpoints(client):
    grid_id = client.post("/grids", content=GRID_YAML).json()["id"]
    assert client.get(f"/grids/{grid_id}/comparison").json()["design"] == "welch"
    assert client.get(f"/grids/{grid_id}/comparison", params={"design": "paired"}).json()["design"] == "paired"
    assert client.get(f"/grids/{grid_id}/comparison", params={"design": "pooled"}).status_code == 422
    plan = client.get(f"/grids/{grid_id}/plan", params={"delta": 0.5})
    assert plan.status_code == 200 and plan.json()["rows"] == [] and plan.json()["power"] == 0.8
    for params in ({}, {"delta": -1}, {"delta": 0.5, "power": 1.5}, {"delta": "nan"}):
        assert client.get(f"/grids/{grid_id}/plan", params=params).status_code == 422
    assert client.get("/grids/nope/plan", params={"delta": 0.5}).status_code == 404
    r = client.get(f"/grids/{grid_id}/plan", params={"delta": 0.5, "baseline": "nope"})
    assert r.status_code == 400 and "not a variant" in r.json()["detail"]


def test_an_alias_bomb_is_refused_at_once_and_the_service_stays_up(client):
    """597 bytes standing for 10^9 seeds: before the bound, 10.7 s, 1.97 GB and a 522 MB answer."""
    for levels in (9, 30):
        started = time.monotonic()
        r = client.post("/grids", content=alias_bomb(levels), headers={"content-type": "application/yaml"})
        assert r.status_code == 422 and "once its aliases are expanded" in r.json()["detail"]
        assert len(r.content) < 300 and time.monotonic() - started < 5
        assert client.get("/health").json() == {"status": "ok"}


def test_an_anchor_shared_by_variants_is_still_fine(client):
    body = GRID_YAML.replace("variants: [original, full_preact]",
                             "variants: [{name: a, unit: original, recipe: &r {base: smoke, lr: 0.02}},\n"
                             "           {name: b, unit: full_preact, recipe: *r}]")
    assert client.post("/grids", content=body).status_code == 201


DEEP = 100_000


@pytest.mark.parametrize("body,needle", [
    (GRID_YAML + "baseline: " + "[" * 100 + "]" * 100 + "\n", "nests deeper than 32 levels"),
    ('{"name": "x", "seeds": ' + "[" * DEEP + "]" * DEEP + "}", "nest"),  # a RecursionError (500) before
    (GRID_YAML.replace("seeds: 2", "seeds: " + "9" * 5000), "over 4096 characters"),  # a ValueError (500)
    (GRID_YAML.replace("seeds: 2", "seeds: " + ":".join(["59"] * 20_000)), "over 4096 characters"),  # base 60
    (GRID_YAML + "baseline: 2001-13-45\n", "cannot be read"),  # a date YAML reads and Python cannot hold
    (GRID_YAML.replace("depths: [8]", "depths: [" + ", ".join(["8"] * 100_001) + "]"), "more than 100000 values"),
    (GRID_YAML.replace("depths: [8]", "depths: [" + ", ".join(["8"] * 50_000) + "]"), "depths repeat: [8, 8, 8"),
    (GRID_YAML.replace("seeds: 2", "seeds: " + "9" * 4000), "seeds count 99999"),
    (GRID_YAML + "k" * 1000 + ": 1\n", "Extra inputs are not permitted"),
    (GRID_YAML.replace("[original, full_preact]", "[" + "v" * 4000 + "]"), "unknown variant 'vvvv"),
])
def test_small_or_odd_bodies_cost_little_and_answer_a_short_422(client, body, needle):
    """Each of these once answered 500 or echoed its whole input."""
    r = client.post("/grids", content=body, headers={"content-type": "application/yaml"})
    assert r.status_code == 422 and needle in r.json()["detail"], r.text[:500]
    assert len(r.json()["detail"]) < 400


def test_a_slow_submission_never_holds_up_other_requests(service, monkeypatch):
    """Reading and recording a large grid takes seconds: meanwhile the service answers everything else."""
    reading, go_on = threading.Event(), threading.Event()
    read = api.parse_grid_text

    def slow_read(text):
        reading.set()
        go_on.wait(60)
        return read(text)

    monkeypatch.setattr(api, "parse_grid_text", slow_read)
    with TestClient(create_app(service)) as client, ThreadPoolExecutor(2) as pool:  # one event loop for both
        submitted = pool.submit(client.post, "/grids", content=GRID_YAML)
        assert reading.wait(60)
        health = pool.submit(client.get, "/health")
        try:
            assert health.result(timeout=20).status_code == 200 and not submitted.done()
        finally:
            go_on.set()
        assert submitted.result(timeout=60).status_code == 201


def test_a_report_probes_few_networks_and_none_too_large(client):
    """A probe runs on the server's CPU: at most PROBE_MAX_CELLS per report, none past the papers' size."""
    many = {"name": "many", "dataset": "synthetic", "depths": [8], "block": "basic", "width": 4, "recipe": "smoke",
            "seeds": 1, "variants": [{"name": f"s{i}", "shortcut": "scale", "shortcut_scale": i / 10}
                                     for i in range(1, 21)]}
    huge = {**many, "name": "huge", "depths": [170], "width": 1024, "variants": ["original"]}
    for grid, probed in ((many, reporting.PROBE_MAX_CELLS), (huge, 0)):
        grid_id = client.post("/grids", json=grid).json()["id"]
        reporting._probe.cache_clear()
        assert client.get(f"/grids/{grid_id}/report").status_code == 200
        assert reporting._probe.cache_info().misses == probed
