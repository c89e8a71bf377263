"""A live `ablate serve`: grids over HTTP, a service restart mid-grid, schemathesis, and a real browser."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orchestrator.state import StateStore
from tests.conftest import free_port, wait_http
from tests.helpers import ARTIFACTS, ROOT, ablate, chromium, render_in_browser, wait_for

GRID = {"name": "served", "dataset": "synthetic", "subset": 512, "depths": [8], "block": "basic", "width": 4,
        "variants": ["original", "full_preact"], "seeds": 2,
        "recipe": {"base": "smoke", "iterations": 160, "checkpoint_every": 10, "eval_every": 40, "milestones": [120]}}


class Server:
    def __init__(self, home: Path, mlflow_uri: str):
        self.home, self.port, self.proc = home, free_port(), None
        self.env = {**os.environ, "ABLATE_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_uri,
                    "ABLATE_STALE_AFTER_S": "4"}
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("ABLATE_STATE_URL", None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.home.parent / "serve.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--port", str(self.port)],
                                     cwd=ROOT, env=self.env, stdout=log, stderr=log, start_new_session=True)
        wait_http(f"{self.url}/health", 120, self.proc)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the service and the local Ray it started
        self.proc.wait()

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=120) as r:
            body = r.read()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body.decode()



@pytest.fixture(scope="module")
def served(tmp_path_factory, mlflow_server):
    root = tmp_path_factory.mktemp("serve")
    server = Server(root / "home", mlflow_server.uri)
    server.start()
    grid_file = root / "grid.json"
    grid_file.write_text(json.dumps(GRID))
    submitted = ablate("submit", str(grid_file), "--server", server.url, "--json", env=server.env)
    assert submitted.code == 0, submitted.err
    grid_id = submitted.json["id"]
    store = StateStore(f"sqlite:///{root / 'home' / 'state.db'}")
    # Restart the service while the grid runs: it must resume the grid without repeating a trial.
    assert wait_for(lambda: store.counts(grid_id)["finished"] >= 1 and store.counts(grid_id)["running"] >= 1, 300)
    server.kill()
    server.start()
    assert wait_for(lambda: store.counts(grid_id)["finished"] == 4, 600), store.counts(grid_id)
    yield server, grid_id, store
    server.kill()


@pytest.mark.slow
def test_grid_submitted_over_http_completes_after_a_restart(served):
    server, grid_id, store = served
    status = ablate("status", grid_id, "--server", server.url, "--json", env=server.env).json
    assert status["finished"] == 4 and status["error"] == 0
    for trial in store.grid_trials(grid_id):
        finished = [a for a in store.attempts(trial["key"]) if a.outcome == "finished"]
        assert len(finished) == 1, "no trial is trained to the end twice"
    doc = server.get(f"/grids/{grid_id}/comparison")
    assert [r["variant"] for r in doc["rows"]] == ["original", "full_preact"] and doc["rows"][0]["n"] == 2
    cli = ablate("compare", grid_id, "--server", server.url, "--json", env=server.env).json
    assert cli["rows"] == doc["rows"]


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(served):
    server, _, _ = served
    out = subprocess.run([str(Path(sys.executable).parent / "st"), "run", f"{server.url}/openapi.json",
                          "--checks", "not_a_server_error", "--max-examples", "25", "--seed", "1",
                          "--exclude-method", "DELETE", "--request-timeout", "60"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (make setup installs it)")
def test_index_and_report_render_in_chromium(served):
    server, grid_id, _ = served
    ARTIFACTS.mkdir(exist_ok=True)
    index = _Collect()
    index.feed(render_in_browser(f"{server.url}/", ARTIFACTS / "index.png"))
    links = [a.get("href") for tag, a in index.tags if tag == "a"]
    assert f"/grids/{grid_id}/report" in links
    report = _Collect()
    report.feed(render_in_browser(f"{server.url}/grids/{grid_id}/report", ARTIFACTS / "report.png"))
    classes = [a.get("class", "") for _, a in report.tags]
    assert any("comparison" in c for c in classes) and any("errorbars" in c for c in classes)
    assert sum(1 for tag, _ in report.tags if tag == "svg") >= 3  # error bars, curves, probes
    assert "full_preact" in "".join(report.text)
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
