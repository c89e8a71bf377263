"""Recipe tuning: an Optuna study whose trials run as Ray tasks, stored in Ablate's state database.

One module per part, in the order a study meets them:
- spec.py: the tuning spec and its search space's structure (`TuneSpec`, `load_tune_spec`, `TuneError`);
- space.py: Optuna distributions, the recipe a trial's parameters make, pruners;
- storage.py: Optuna's storage on the state database (`open_storage`);
- task.py: the Ray task body, which trains one trial and prunes it from inside (`execute_tuning_trial`);
- heartbeat.py: heartbeats for running trials, and failing those a dead driver left;
- mirror.py: the study's MLflow mirror (`StudyRuns`);
- driver.py: the ask/tell loop (`run_study`).
The best trial's full recipe is saved in the state store (`BaseStateStore.save_tuned`) under the study
name with its provenance; a grid names it as `recipe: tuned/<name>` (`BaseStateStore.tuned_recipes`).
"""
from .driver import StudyInterrupted, run_study, summarize
from .mirror import StudyRuns
from .space import make_pruner, search_space, trial_recipe
from .spec import TUNABLE, TuneError, TuneSpec, load_tune_spec, parse_tune_spec
from .storage import open_storage
from .task import PruningSink, execute_tuning_trial

__all__ = ["TUNABLE", "PruningSink", "StudyInterrupted", "StudyRuns", "TuneError", "TuneSpec", "execute_tuning_trial",
           "load_tune_spec", "make_pruner", "open_storage", "parse_tune_spec", "run_study", "search_space",
           "summarize", "trial_recipe"]
