"""Resuming after a dead driver: heartbeats for the trials a driver runs, and failing those a dead one left.

The driver records an Optuna heartbeat for each of its running trials. A RUNNING trial whose heartbeat
is older than the storage's grace period (ABLATE_STALE_AFTER_S, the grid scheduler's threshold) belongs to
a dead driver and is marked FAIL, kept for the record but not repeated. A driver killed between asking a
trial and its first heartbeat leaves a RUNNING trial Optuna never calls stale; the next driver beats once
for every RUNNING trial it does not run, so that one goes stale too.
"""
from __future__ import annotations

import threading


class Heartbeat:
    """Records an Optuna heartbeat for each trial this driver runs, from a thread, so a slow MLflow call
    on the driver's loop never makes a live trial look abandoned."""

    def __init__(self, storage, every: float):
        self.storage, self.every = storage, every
        self.ids: set[int] = set()
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tune-heartbeat", daemon=True)
        self.thread.start()

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)
        with self.lock:
            self.ids.add(trial_id)

    def discard(self, trial_id: int) -> None:
        with self.lock:
            self.ids.discard(trial_id)

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            with self.lock:
                ids = list(self.ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:
                    pass  # the next beat tries again; only a long silence fails the trial

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def fail_stale(study, storage, adopted: set[int], ours: frozenset[int] = frozenset()) -> None:
    """Marks FAIL the RUNNING trials whose driver died. Optuna only judges trials that have a heartbeat;
    one asked by a driver killed before its first beat would wait forever. Beating once for each RUNNING
    trial that is not ours gives it a heartbeat: a live driver keeps beating, a dead one never does."""
    import optuna
    optuna.storages.fail_stale_trials(study)  # first: a stale heartbeat must not be refreshed below
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t._trial_id not in ours and t._trial_id not in adopted:
            storage.record_heartbeat(t._trial_id)
            adopted.add(t._trial_id)
