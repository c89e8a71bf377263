"""Where a trial's metrics go. The trainer calls a sink at its log points (about 1% of the run), at
evaluations, and live at least every `log_every_s` seconds: never per step.

Contract of `MetricsSink`: `begin` is called once before the first step with the iteration training starts
from and the run's length (for progress and ETAs); `log` receives a flat dict of floats and the iteration
as step, at most once per step; both must return quickly (no network round trip on the caller's thread:
buffer and ship elsewhere) and must not raise on delivery problems; `close` flushes everything and is
called once, also after divergence.
"""
from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from typing import IO, Any


class MetricsSink(ABC):
    def begin(self, start: int, iterations: int) -> None:
        """Training starts at iteration `start` of `iterations`."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None:
        """Flush what is buffered; called once at the end of the trial."""


class NullSink(MetricsSink):
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass


class JsonLinesSink(MetricsSink):
    """One JSON object per record on a text stream (standard error under `ablate train`)."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stderr

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.stream.write(json.dumps({"step": step, **metrics}) + "\n")
        self.stream.flush()


class MemorySink(MetricsSink):
    """Keeps every record; for tests and for callers that log elsewhere afterwards."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.records.append({"step": step, **metrics})
