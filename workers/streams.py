"""Random streams: every random draw of a trial is a function of (seed, stream, index).

So the iteration stored in a checkpoint is the whole random state, and a resumed run repeats an
uninterrupted one. Shared by the in-memory trainer and the streamed image folders (workers/imagefolder.py).
"""
from __future__ import annotations

import numpy as np
import torch

from .data import DataError

STREAM_ORDER, STREAM_AUGMENT, STREAM_STEP = 1, 2, 3


def stream_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed for one named random stream."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class Batches:
    """Training batches as index tensors: epoch e is a permutation drawn from (seed, e); the last partial
    batch of an epoch is dropped so every step has the same size."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise DataError(f"the training set has {n} examples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, iteration: int) -> torch.Tensor:
        epoch, i = divmod(iteration, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, STREAM_ORDER, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm[i * self.batch_size:(i + 1) * self.batch_size]
