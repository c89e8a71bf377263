"""A trial's configuration and identity, without torch: the driver expands grids without loading it."""
from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ablations.spec import ModelSpec, omit_at_defaults
from ablations.vocabulary import Subset

from .recipes import Recipe

# Bump when a change to the code changes what a configuration trains to: it is part of every trial key.
# 2: the paper's dropout shortcut (keep-mask, expectation 1 − p), divergence scored in the last finite
#    state and detected on exploding finite losses, gates in fp32, logging and precision fields.
SCHEMA_VERSION = 2


class TrialConfig(BaseModel):
    """Everything that decides a trial's outcome; its hash is the trial's identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelSpec
    dataset: str
    subset: Subset | None = None
    validation: float = Field(0.0, ge=0.0, lt=1.0)
    recipe: Recipe
    seed: int = Field(ge=0, le=2**31 - 1)
    # Workers (devices) the global batch is split over, from a grid's `resources.workers`. Each normalises
    # its share by its own BN statistics (the paper's CIFAR runs: 128 on 2 GPUs, 64 per BN) unless the
    # recipe's `sync_bn`, so the world size is part of what trains.
    workers: int = Field(1, ge=1, le=4096)
    schema_version: int = SCHEMA_VERSION

    # Fields added after trial keys were first made, left out of the dump at their defaults.
    _later = omit_at_defaults("workers")

    @model_validator(mode="after")
    def _check_workers(self) -> "TrialConfig":
        if self.recipe.batch_size % self.workers:
            raise ValueError(f"batch_size {self.recipe.batch_size} does not split into {self.workers} equal "
                             f"shards (one per worker)")
        if self.recipe.sync_bn and self.workers == 1:
            raise ValueError("sync_bn only means something with several workers (resources.workers > 1)")
        return self

    def key(self) -> str:
        """Content hash of the resolved configuration: the same trial in two grids has one key."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]
