"""Shared test helpers: run the real `ablate` command line in a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"  # screenshots of browser tests, kept for people to look at


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self):
        return json.loads(self.out)


def ablate(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None) -> Result:
    """`ablate ARGS` as a user runs it, with the environment's ABLATE_* overrides applied."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT, env={**os.environ, **(env or {})})
    return Result(proc.returncode, proc.stdout, proc.stderr)


def wait_for(predicate, timeout: float = 120.0, every: float = 0.2) -> bool:
    """Poll until `predicate()` holds or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def alias_bomb(levels: int = 9, fanout: int = 10) -> str:
    """A grid in a few hundred bytes of YAML whose `seeds` stand for `fanout ** levels` values through
    aliases (nine levels of ten: 10^9 values in about 600 bytes)."""
    chain = ["&a0 [0]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return ("name: bomb\ndataset: synthetic\ndepths: [8]\nblock: basic\nvariants: [original]\n"
            f"seeds: [{', '.join(chain)}]\n")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render_in_browser(url: str, screenshot: Path, run_ms: int | None = None, size: str = "1280,2400") -> str:
    """The DOM after the page ran, as headless Chromium serialises it, and a screenshot of that same moment.
    `run_ms`: virtual time the page gets to run first (a single-page app fetching its data), instead of stopping
    at its load event."""
    profile = tempfile.mkdtemp()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", f"--window-size={size}",
             *([f"--virtual-time-budget={run_ms}"] if run_ms else [])]
    dom = subprocess.run([chromium(), *flags, f"--screenshot={screenshot}", "--dump-dom", url], capture_output=True,
                         text=True, timeout=180)
    shutil.rmtree(profile, ignore_errors=True)
    return dom.stdout
