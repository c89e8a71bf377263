"""The Ray task body of a tuning trial: the task opens the study itself and wraps its trial
(`optuna.trial.Trial(study, trial_id)`); a `PruningSink` reports each evaluation's validation error and
asks the pruner, raising `optuna.TrialPruned` out of the training loop when told to stop. The task then
returns {"pruned": True}, its slot is free at once, and the driver tells PRUNED.

Every trial trains on the training set minus a held-out `validation` fraction and is scored by its final
validation error (%); the test set is never read.
"""
from __future__ import annotations

from typing import Any, Callable

from workers.config import TrialConfig
from workers.sinks import MetricsSink

from .space import make_pruner
from .storage import open_storage


class PruningSink(MetricsSink):
    """Reports each evaluation's validation error to the trial and stops training when the pruner says so.

    Unlike the other sinks it waits on the database and raises (`optuna.TrialPruned`): a pruning decision
    is only worth something before the next iterations are spent. Once per evaluation, not per step.
    """

    def __init__(self, trial, iterations: int):
        self.trial, self.iterations = trial, iterations
        self.records: list[dict[str, Any]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        import optuna
        self.records.append({"step": step, **metrics})
        if metrics.get("test_error") is None or any(r["step"] == step for r in self.records[:-1]):
            return  # a diverged run's last word at an already reported step
        self.trial.report(metrics["test_error"], step)
        # At the last evaluation nothing is left to save: the trial completes with its final value.
        if step < self.iterations and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at iteration {step}")


def execute_tuning_trial(task: dict[str, Any], train: Callable[..., dict] | None = None) -> dict[str, Any]:
    """The Ray task body: train one Optuna trial on the validation split, reporting as it goes.

    `train` stands in for `workers.trainer.run_trial` (same signature): the pruning tests feed curves.
    """
    import optuna
    from workers.trainer import run_trial  # torch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = TrialConfig.model_validate_json(task["config"])
    study = optuna.load_study(study_name=task["study"], storage=open_storage(task["store_url"]),
                              sampler=optuna.samplers.RandomSampler(),
                              pruner=make_pruner(task["pruner"], config.recipe))
    sink = PruningSink(optuna.trial.Trial(study, task["trial_id"]), config.recipe.iterations)
    try:
        result = (train or run_trial)(config, sink=sink, threads=task["threads"], device=task["device"],
                                      data_dir=task.get("data_dir"))
    except optuna.TrialPruned:
        return {"pruned": True, "step": sink.records[-1]["step"], "history": sink.records}
    return {"pruned": False, "value": result["test_error"], "status": result["status"],
            "evaluated_on": result["evaluated_on"], "history": result["history"]}
