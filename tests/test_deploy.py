"""docker-compose.yml is a real, complete deployment: validated by docker-compose itself (no engine needed)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                reason="Debian's docker-compose is not installed (.ci/run installs it)")
ENV = {**os.environ, "ABLATE_TOKEN": "t0ken", "RAY_AUTH_TOKEN": "r4y"}


def config(env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_compose_file_is_valid_and_complete():
    out = config()
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    assert set(services) >= {"postgres", "mlflow", "ray-head", "ray-worker", "api", "optuna-dashboard"}
    for name in ("postgres", "mlflow", "ray-head", "api"):
        assert "healthcheck" in services[name], name
    mlflow = " ".join(services["mlflow"]["command"])
    assert "postgresql" in mlflow and "--serve-artifacts" in mlflow
    gpus = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpus["capabilities"] == ["gpu"]
    api = services["api"]["environment"]
    assert api["ABLATE_STATE_URL"].startswith("postgresql") and api["RAY_ADDRESS"] == "ray-head:6379"
    assert api["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and api["ABLATE_TOKEN"] == "t0ken"
    # Every Ray node and the API mount the same checkpoint volume: retried trials resume anywhere.
    for name in ("ray-head", "ray-worker", "api"):
        assert any(str(v).split(":")[1] == "/shared/checkpoints" for v in services[name]["volumes"]), name


def test_compose_refuses_to_start_the_api_without_a_token():
    out = config({k: v for k, v in ENV.items() if k != "ABLATE_TOKEN"})
    assert out.returncode != 0 and "ABLATE_TOKEN" in out.stderr
