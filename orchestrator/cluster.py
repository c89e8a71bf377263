"""The Ray connection every driver shares (grid runs, tuning studies): one place decides which cluster."""
from __future__ import annotations

import os

from ablations.vocabulary import first_line


class ClusterError(RuntimeError):
    """Ray could not be reached or started: not the user's input, and not a result (the CLI exits 1)."""


def ensure_ray() -> None:
    """Connect to RAY_ADDRESS when set, else start a private local Ray (never someone else's)."""
    import ray  # seconds to import: only drivers that schedule pay for it
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise ClusterError(f"cannot connect to the Ray cluster at RAY_ADDRESS={address}: "
                               f"{first_line(exc)}") from None
        return
    # A machine under heavy load can miss Ray's startup deadline once ("The current node timed out during
    # startup"); a second start usually makes it, and a grid run should not be lost to that.
    for attempt in (1, 2):
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            return
        except Exception as exc:  # Ray raises a bare Exception for a startup timeout
            ray.shutdown()
            if attempt == 2:
                raise ClusterError(f"a local Ray did not start: {first_line(exc)}") from None
