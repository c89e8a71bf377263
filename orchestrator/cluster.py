"""The Ray connection every driver shares (grid runs, tuning studies): one place decides which cluster."""
from __future__ import annotations

import os


def ensure_ray() -> None:
    """Connect to RAY_ADDRESS when set, else start a private local Ray (never someone else's)."""
    import ray  # seconds to import: only drivers that schedule pay for it
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
