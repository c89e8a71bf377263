"""Fixtures for tests that use real services: an MLflow server, a PostgreSQL cluster, a local Ray, an isolated home."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.postgres import Postgres, postgres_missing

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout:g} s")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (its backend: a sqlite file under ROOT unless `backend` names a
    database); can be stopped and started again."""

    def __init__(self, root: Path, backend: str | None = None, workers: int = 1):
        self.root, self.port, self.proc = root, free_port(), None
        self.backend, self.workers = backend, workers

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.root / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(self.workers), "--backend-store-uri", self.backend or f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=log, start_new_session=True)
        try:
            wait_http(f"{self.uri}/health", timeout=180, proc=self.proc)
        except (TimeoutError, RuntimeError):
            self.stop()  # never leave a server behind a failed start (a busy machine can take minutes)
            raise

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # its job runners can take longer on a loaded machine
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster for the session; tests make their own databases in it."""
    if reason := postgres_missing():
        pytest.skip(reason)
    scratch = Path(tempfile.mkdtemp(prefix="ablate-pg-", dir="/tmp"))  # short (socket path); `postgres` may enter
    os.chmod(scratch, 0o755)
    server = Postgres(scratch / "pg", free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def local_ray():
    """One private local Ray for the in-process scheduler tests (starting Ray costs seconds)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ablate_home(tmp_path, monkeypatch):
    """An empty $ABLATE_HOME with the embedded defaults beneath it."""
    home = tmp_path / "home"
    monkeypatch.setenv("ABLATE_HOME", str(home))
    for var in ("ABLATE_STATE_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "ABLATE_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    return home
