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


def alias_bomb(levels: int = 9, fanout: int = 10) -> str:
    """A grid in a few hundred bytes of YAML whose `seeds` stand for `fanout ** levels` values through
    aliases (nine levels of ten: 10^9 values in about 600 bytes)."""
    chain = ["&a0 [0]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return ("name: bomb\ndataset: synthetic\ndepths: [8]\nblock: basic\nvariants: [original]\n"
            f"seeds: [{', '.join(chain)}]\n")
