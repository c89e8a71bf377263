"""Where the one training loop (workers/trainer.py) takes its batches from, and how it scores a model on them.

A `BatchSource` is one trial's view of its dataset: a small dataset held on the device (trainer.DeviceData)
or an ImageFolder tree streamed from disk (imagefolder.ImageFolderSource). The loop asks it for each seed's
training batch at each iteration and for the evaluation batches, and never knows which kind it reads.

Several workers of one trial (DistributedDataParallel) each hold their own source, told their `Shard`: the
global batch of an iteration is the one a single device would train on, and rank r takes the r-th equal
slice of it, so the data order and augmentation are a function of (seed, iteration, rank) and a trial
resumed at another world size continues the same stream of global batches. Evaluation is sharded the same
way, and `score` sums over the ranks.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


class Shard(NamedTuple):
    """This worker's place among the trial's workers."""
    rank: int
    world: int

    def part(self, n: int) -> slice:
        """Rank r's slice of n items: the r-th of `world` near-equal blocks, in order."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


class BatchSource(ABC):
    """One trial's data, as the training loop reads it.

    Contract: `train_batch(slot, iteration)` is seed `seeds[slot]`'s batch at that iteration (this worker's
    shard of it when sharded): x float, normalised, channels_last on the source's device, y int64; it is a
    function of (seed, iteration, shard) alone, so a run resumed at iteration k sees the batches an
    uninterrupted one sees from k on. The loop asks for consecutive iterations from where it starts (a
    streaming source may decode ahead). `eval_batches(images)` gives the images evaluated (the whole split
    when `images` is None, else a fixed `images` of them) and, per view, an iterable of batches (this
    worker's shard): the view named "" is the reported one, others (the ImageNet 224 crop) name a suffix
    of their metrics.

    Attributes: `train_size`, `test_size` (images of a full evaluation), `image_size` (training crop side),
    `evaluated_on` ("test" or "validation"), `top5` (whether the top-5 error is reported).
    """

    train_size: int
    test_size: int
    image_size: int
    evaluated_on: str
    top5: bool = False

    @abstractmethod
    def train_batch(self, slot: int, iteration: int) -> Batch: ...

    @abstractmethod
    def eval_batches(self, images: int | None) -> tuple[int, dict[str, Iterable[Batch]]]: ...


@torch.no_grad()
def score(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device, bf16: bool, top5: bool = False,
          shard: Shard | None = None) -> torch.Tensor:
    """Per copy of the model (a fused group has k), the sums [misclassified, loss, images(, top-5 misses)]
    over the batches, in evaluation mode (BN running statistics), summed over all workers when sharded.
    An image whose logits are not finite counts as misclassified (argmax of NaN would pick class 0 and score
    a constant)."""
    k = getattr(model, "groups", 1)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4 if top5 else 3, k, device=device)
    for xb, yb in batches:
        xb = xb.repeat(1, k, 1, 1).contiguous(memory_format=torch.channels_last)
        yb = yb[:, None].expand(-1, k)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(xb).float().unflatten(1, (k, -1))  # [B, k, classes]
        finite = torch.isfinite(logits).all(2)
        sums[0] += ((logits.argmax(2) != yb) | ~finite).sum(0)
        sums[1] += F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").sum(0)
        sums[2] += len(yb)
        if top5:
            top = logits.topk(min(5, logits.shape[2]), dim=2).indices
            sums[3] += (~(top == yb[..., None]).any(2) | ~finite).sum(0)
    model.train(was_training)
    if shard is not None:
        torch.distributed.all_reduce(sums)
    return sums


def metrics(sums: torch.Tensor, suffix: str = "") -> list[dict[str, float | None]]:
    """`score`'s sums as per-copy test error %, mean loss (None when not finite) and top-5 error %."""
    out = []
    for column in sums.T.tolist():
        wrong, loss, images = column[:3]
        entry = {f"test_error{suffix}": 100.0 * wrong / images,
                 f"test_loss{suffix}": loss / images if math.isfinite(loss) else None}
        if len(column) > 3:
            entry[f"test_error_top5{suffix}"] = 100.0 * column[3] / images
        out.append(entry)
    return out
