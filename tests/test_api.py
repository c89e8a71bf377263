"""The HTTP API layer: routes, status codes and details, auth, limits (in-process, no scheduling)."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from orchestrator.api import MAX_BODY_BYTES, create_app
from orchestrator.service import GridService
from orchestrator.state import StateStore
from orchestrator.tracking import Tracker

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
    assert cancelled["cancelled"] and cancelled["cancelled_queued"] == 4


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
    assert client.get(f"/grids/{grid_id}/comparison").json()["design"] == "paired"
    assert client.get(f"/grids/{grid_id}/comparison", params={"design": "welch"}).json()["design"] == "welch"
    assert client.get(f"/grids/{grid_id}/comparison", params={"design": "pooled"}).status_code == 422
    plan = client.get(f"/grids/{grid_id}/plan", params={"delta": 0.5})
    assert plan.status_code == 200 and plan.json()["rows"] == [] and plan.json()["power"] == 0.8
    for params in ({}, {"delta": -1}, {"delta": 0.5, "power": 1.5}, {"delta": "nan"}):
        assert client.get(f"/grids/{grid_id}/plan", params=params).status_code == 422
    assert client.get("/grids/nope/plan", params={"delta": 0.5}).status_code == 404
    r = client.get(f"/grids/{grid_id}/plan", params={"delta": 0.5, "baseline": "nope"})
    assert r.status_code == 400 and "not a variant" in r.json()["detail"]
