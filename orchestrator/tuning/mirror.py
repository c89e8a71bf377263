"""MLflow as the study's mirror: one experiment named after the study, a parent run for it, and a child
run per ended trial (tags `ablate.study`, `optuna.trial`) with its parameters and validation curve.
Missing child runs (tracking server down, driver killed) are logged on the next run."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

from ..tracking import Tracker, flatten
from .spec import TuneSpec, decode_param, first_line


class StudyRuns:
    """The study's MLflow mirror. MLflow trouble never stops tuning: the first failure is reported once,
    the rest of this run skips MLflow, and the next run logs what is missing from the study's record."""

    def __init__(self, tracker: Tracker, spec: TuneSpec):
        self.tracker, self.spec = tracker, spec
        self.parent: str | None = None
        self.logged: set[int] = set()
        self.down = False

    def _guard(self, fn: Callable[[], Any]) -> Any:
        if self.down:
            return None
        try:
            return fn()
        except Exception as exc:
            self.down = True
            print(f"ablate tune: MLflow unreachable ({first_line(exc, 200)}); runs will be logged by the next "
                  f"`ablate tune`", file=sys.stderr)
            return None

    def open(self) -> None:
        self._guard(self._open)

    def _open(self) -> None:
        from mlflow.entities import Param
        client, name = self.tracker.client, self.spec.name
        exp = self.tracker.experiment(name)
        found = client.search_runs([exp], f"tags.`ablate.study` = '{name}' and tags.`ablate.role` = 'study'",
                                   max_results=1)
        if found:
            self.parent = found[0].info.run_id
            client.update_run(self.parent, status="RUNNING")
        else:
            run = client.create_run(exp, run_name=name, tags={"ablate.study": name, "ablate.role": "study"})
            self.parent = run.info.run_id
            params = [Param(k, v) for k, v in flatten("", self.spec.identity()).items()][:100]
            client.log_batch(self.parent, params=params)
        children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{self.parent}'", max_results=50_000)
        for run in children:
            if run.info.status == "RUNNING":
                client.delete_run(run.info.run_id)  # half-logged by a driver that died: logged again
            else:
                self.logged.add(int(run.data.tags["optuna.trial"]))

    def log_trial(self, trial) -> None:
        if self.parent is not None and trial.number not in self.logged:
            self._guard(lambda: self._log_trial(trial))

    def _log_trial(self, trial) -> None:
        from mlflow.entities import Metric, Param
        client, state = self.tracker.client, trial.state.name
        tags = {"mlflow.parentRunId": self.parent, "ablate.study": self.spec.name, "optuna.trial": str(trial.number),
                "optuna.state": state}
        if trial.user_attrs.get("error"):
            tags["ablate.error"] = str(trial.user_attrs["error"])[:4000]
        run_id = client.create_run(self.tracker.experiment(self.spec.name), run_name=f"trial-{trial.number}",
                                   tags=tags).info.run_id
        params = {**{k: str(decode_param(k, v)) for k, v in trial.params.items()},
                  **flatten("recipe", trial.user_attrs.get("recipe", {}))}
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()][:100])
        now = int(time.time() * 1000)
        history = trial.user_attrs.get("history", [])
        metrics = [Metric(k, float(v), now, int(h["step"])) for h in history for k, v in h.items()
                   if k != "step" and v is not None]
        seen = {h["step"] for h in history}
        metrics += [Metric("val_error", float(v), now, int(step)) for step, v in trial.intermediate_values.items()
                    if step not in seen]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.set_terminated(run_id, {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))
        self.logged.add(trial.number)

    def reconcile(self, study) -> None:
        from optuna.trial import TrialState
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                               TrialState.FAIL)):
            self.log_trial(trial)

    def close(self, summary: dict[str, Any], status: str = "FINISHED") -> None:
        if self.parent is not None:
            self._guard(lambda: self._close(summary, status))

    def _close(self, summary: dict[str, Any], status: str) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(summary[k]), now, 0) for k in ("best_value", "n_complete", "n_pruned", "n_failed")
                   if summary.get(k) is not None]
        self.tracker.client.log_batch(self.parent, metrics=metrics)
        self.tracker.client.set_terminated(self.parent, status)
