"""Where a trial's metrics go. The trainer calls a sink at evaluation points only, never per step.

Contract of `MetricsSink`: `log` receives a flat dict of floats and the iteration as step; it must return
quickly (no network round trip on the caller's thread: buffer and ship elsewhere) and must not raise on
delivery problems; `close` flushes everything and is called once, also after divergence.
"""
from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from typing import IO, Any


class MetricsSink(ABC):
    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None:
        """Flush what is buffered; called once at the end of the trial."""


class NullSink(MetricsSink):
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass


class JsonLinesSink(MetricsSink):
    """One JSON object per evaluation on a text stream (standard error under `ablate train`)."""

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
