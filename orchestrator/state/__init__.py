"""Persistent state: grids, trials, attempts, results and tuned recipes in one SQL database.

- base.py: the contract every store keeps (`BaseStateStore`: atomic claims, immutable results, …) and
  the operations, written once;
- sql.py: the store on sqlite (default, under $ABLATE_HOME) or PostgreSQL (`ABLATE_STATE_URL`);
- models.py: the tables; migrate.py and migrations/: their schema under Alembic.
`get_store(None | url | store)` is how the rest of Ablate gets one.
"""
from .base import STALE_AFTER_S, BaseStateStore, StateError
from .models import AttemptRow, GridRow, GridTrialRow, Meta, TrialRow, TunedRecipeRow
from .sql import StateStore, ablate_home, default_state_url, dialect_of, get_store, safe_url

__all__ = ["STALE_AFTER_S", "AttemptRow", "BaseStateStore", "GridRow", "GridTrialRow", "Meta", "StateError",
           "StateStore", "TrialRow", "TunedRecipeRow", "ablate_home", "default_state_url", "dialect_of", "get_store",
           "safe_url"]
