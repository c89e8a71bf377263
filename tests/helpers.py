"""Shared test helpers: run the real `ablate` command line in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
