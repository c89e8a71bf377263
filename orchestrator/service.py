"""The long-running scheduler behind `ablate serve`: submitted grids run in the background.

A monitor loop looks at the state store every few seconds and starts one GridRunner thread per grid
that still has work (queued trials, or running ones whose owner went silent) and is not cancelled.
Because everything it needs is in the store, a restarted service resumes every unfinished grid, and
the runners' atomic claims keep a trial from running twice. Grids running at the same time split the
cluster's slots evenly (`GridRunner.share`).
"""
from __future__ import annotations

import json
import sys
import threading
import traceback

from ablations.vocabulary import ACTIVE

from .grids import GridSpec, parse_grid
from .scheduler import GridRunner
from .state import BaseStateStore, get_store
from .tracking import Tracker

MONITOR_EVERY_S = 2.0


class GridService:
    def __init__(self, store: BaseStateStore | str | None = None, tracker: Tracker | None = None, **runner_options):
        self.store = get_store(store)
        self.tracker = tracker or Tracker()
        self.runner_options = runner_options
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def _runner(self) -> GridRunner:
        return GridRunner(store=self.store, tracker=self.tracker, progress=False, share=self.active_count,
                          **self.runner_options)

    def submit(self, spec: GridSpec) -> str:
        """Record the grid; the monitor starts it. Submitting the same spec again is harmless."""
        grid_id = self._runner().submit(spec)
        self.wake()
        return grid_id

    def active_count(self) -> int:
        with self._lock:
            return max(1, sum(t.is_alive() for t in self._running.values()))

    def has_work(self, grid_id: str) -> bool:
        if self.store.is_cancelled(grid_id):
            return False
        counts = self.store.counts(grid_id)
        if any(counts[s] for s in ACTIVE):
            return True
        # Ended trials whose MLflow runs could not be synced yet (server down): the runner syncs them.
        return self.store.unsynced(grid_id) > 0

    def _run_grid(self, grid_id: str, spec: GridSpec) -> None:
        try:
            self._runner().run(spec)
        except Exception:  # a grid's failure must not stop the service; the trials keep their states
            print(f"ablate serve: grid {grid_id} stopped: {traceback.format_exc(limit=3)}", file=sys.stderr)

    def tick(self) -> None:
        """One monitor pass: start a runner for every grid with work and none running it here."""
        for row in self.store.grids():
            if row.cancelled or not self.has_work(row.id):
                continue
            with self._lock:
                thread = self._running.get(row.id)
                if thread is not None and thread.is_alive():
                    continue
                spec = parse_grid(json.loads(row.spec))
                thread = threading.Thread(target=self._run_grid, args=(row.id, spec), name=f"grid-{row.id}",
                                          daemon=True)
                self._running[row.id] = thread
                thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                print(f"ablate serve: monitor pass failed: {traceback.format_exc(limit=3)}", file=sys.stderr)
            self._stop.wait(MONITOR_EVERY_S)

    def wake(self) -> None:
        """Start a submitted grid now rather than at the next monitor pass (only once started)."""
        if self._monitor is not None:
            threading.Thread(target=self.tick, daemon=True).start()

    def start(self) -> None:
        self._monitor = threading.Thread(target=self._loop, name="grid-monitor", daemon=True)
        self._monitor.start()

    def stop(self) -> None:
        self._stop.set()
