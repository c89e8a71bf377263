"""A trial's configuration and identity, without torch: the driver expands grids without loading it."""
from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

from ablations.spec import ModelSpec

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
    subset: int | None = Field(None, ge=1)
    validation: float = Field(0.0, ge=0.0, lt=1.0)
    recipe: Recipe
    seed: int = Field(ge=0, le=2**31 - 1)
    schema_version: int = SCHEMA_VERSION

    def key(self) -> str:
        """Content hash of the resolved configuration: the same trial in two grids has one key."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]
