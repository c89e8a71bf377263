"""Where studies live: Optuna's RDB storage on the state database itself (Ablate's tables are prefixed
`ablate_`, Optuna's are not). A study survives its driver, and several drivers (or optuna-dashboard) can
open it at once."""
from __future__ import annotations

import warnings
from pathlib import Path

from ..state import STALE_AFTER_S, dialect_of
from .spec import TuneError


def shared_url(url: str) -> str:
    """Ray workers start elsewhere: a relative sqlite path must mean the driver's file."""
    if not url.startswith("sqlite:"):
        return url
    path = url.removeprefix("sqlite:///")
    if url in ("sqlite://", "sqlite:///:memory:") or path == url:
        raise TuneError(f"tuning needs a database every Ray worker can open, not {url}")
    return f"sqlite:///{Path(path).resolve()}"


def open_storage(url: str, heartbeat: bool = False):
    """Optuna's RDB storage with the state store's discipline for its database (on sqlite: WAL, a long busy
    timeout, BEGIN IMMEDIATE), so the driver and its tasks never fail on a locked database.

    With `heartbeat`, a RUNNING trial whose heartbeat is older than ABLATE_STALE_AFTER_S (the grid
    scheduler's threshold) counts as abandoned; its driver beats 4× as often.
    """
    import optuna
    dialect = dialect_of(url)
    beat = {"heartbeat_interval": max(1, round(STALE_AFTER_S / 4)), "grace_period": max(1, round(STALE_AFTER_S))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(url, engine_kwargs=dict(dialect.engine_options),
                                             **(beat if heartbeat else {}))
    dialect.setup(storage.engine)
    storage.engine.dispose()  # connections opened before the listeners lack them
    return storage
