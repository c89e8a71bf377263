"""ImageNet-style data streamed from disk: an ImageFolder tree decoded and augmented by DataLoader workers.

ImageNet cannot live on the device as the small datasets do (workers/data.py): 1.28M JPEGs of about
110 KB each. `open_image_folder` returns an `ImageFolderSource`, one trial's view of the tree and the batch source the
training loop reads (workers/sources.py):
- `train_batches(slot, start, stop)`: the (x, y) batches of iterations start..stop-1 of seed `seeds[slot]`,
  x float32 [B, 3, crop, crop] normalised, y int64 [B], in the trainer's order (workers/streams.py
  `Batches`): epoch e is a permutation drawn from (seed, e), the last partial batch of an epoch dropped.
  Resuming at iteration k is `train_batches(slot, k, stop)`: the same batches an uninterrupted run sees
  from k on. `train_batch(slot, iteration)` is the loop's view of that stream, on the device.
- `eval_batches(images)`: the evaluation set at every evaluation crop. The trainer scores top-1 and top-5
  error % and the loss on each: `test_error` and `test_error_top5` are the reported crop's (the paper's
  single 320 crop), the others carry the crop in their name (`test_error_224`, `test_error_top5_224`).
  Intermediate evaluations on `images` of them take evenly spaced ones (the folder order is by class).
- Several workers of one trial each decode their own shard of every global batch and of the evaluation
  set (`shard`).

Layout: `<root>/imagenet/{train,val}/<class>/<image>` (or `<root>/{train,val}/...`), root = `data_dir`
or $ABLATE_DATA_DIR. Any ImageFolder tree works, with the same class folders in train and val (ILSVRC-2012's
validation images sorted into class folders, as its usual valprep.sh does). Class indices follow the sorted
folder names (torchvision's ImageFolder).

Augmentation (fb.resnet.torch datasets/imagenet.lua and transforms.lua, which the paper follows on ImageNet):
scale augmentation by a random-resized crop (8–100% of the area, aspect ratio 3/4–4/3, bicubic) to 224,
colour jitter (brightness, contrast and saturation 0.4, in random order), PCA lighting noise (AlexNet;
alphastd 0.1, ImageNet's RGB eigenvalues and eigenvectors), normalisation by ImageNet's channel mean and
standard deviation, horizontal flip. Evaluation: one centre crop, 224 of the image resized to 256 on its
shorter side (fb.resnet.torch's validation), and 320 of it resized to 320 (the paper's ImageNet figures).

Determinism: the transform of example i in epoch e draws from the stream of (seed, e, i) alone, whichever
worker decodes it, so a rerun (or a resumed run) feeds the same tensors; worker processes are seeded from
the trial's seed too, for any randomness outside the transforms.
"""
from __future__ import annotations

import itertools
import os
import pathlib
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ablations.vocabulary import DATASET_SHAPES

from .data import DataError, image_folder_dir
from .sources import Batch, BatchSource, Shard
from .streams import STREAM_AUGMENT, Batches, stream_seed

TRAIN_CROP = 224
# Evaluation crops, name → (shorter side after resizing, centre crop).
EVAL_CROPS = {"224": (256, 224), "320": (320, 320)}
REPORTED_CROP = "320"  # the paper's ImageNet table: "single 320 crop"
EVAL_BATCH = 100
# fb.resnet.torch datasets/imagenet.lua, "computed from random subset of ImageNet training images".
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
LIGHTING_STD = 0.1
JITTER = 0.4
STREAM_WORKERS = 4  # the DataLoader's base seed, from which each worker process is seeded


class Lighting:
    """AlexNet's PCA colour noise: adds Σ_j v_j · α_j · λ_j to every pixel, α_j ~ N(0, alphastd²) drawn per
    image, (λ_j, v_j) the eigenvalues and eigenvectors of the RGB covariance. Acts on a float [3, H, W]
    image in 0..1, before normalisation."""

    def __init__(self, alphastd: float = LIGHTING_STD, eigval: Sequence[float] = PCA_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = PCA_EIGVEC):
        self.alphastd = alphastd
        self.eigval, self.eigvec = torch.tensor(eigval), torch.tensor(eigvec)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return image
        alpha = torch.randn(3) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)
        return image + rgb.view(3, 1, 1)


def train_transform(crop: int = TRAIN_CROP):
    from torchvision import transforms as T
    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose([T.RandomResizedCrop(crop, interpolation=bicubic), T.ColorJitter(JITTER, JITTER, JITTER),
                      T.ToTensor(), Lighting(), T.Normalize(MEAN, STD), T.RandomHorizontalFlip()])


def eval_transform(resize: int, crop: int):
    from torchvision import transforms as T
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


class _Images(Dataset):
    """Images of a folder by index, transformed. A key (epoch, index) draws the transform's randomness from
    the stream of (seed, epoch, index), the same in any worker and any run; a plain index draws none."""

    def __init__(self, samples: list[tuple[str, int]], transform, seed: int = 0):
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        from PIL import Image
        epoch, index = key if isinstance(key, tuple) else (None, key)
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
        except (OSError, SyntaxError) as exc:  # PIL reports some corrupt files as SyntaxError
            raise DataError(f"{path}: cannot read the image ({exc})") from None
        if epoch is None:
            return self.transform(image), target
        # fork_rng: decoding in the trainer's own process (workers=0) leaves its generator as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(self.seed, STREAM_AUGMENT, epoch, index))
            return self.transform(image), target


class _EpochBatches(Sampler):
    """Keys (epoch, folder index) of iterations [start, stop), in the order of `Batches` over `indices`:
    this shard's part of each global batch."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, start: int, stop: int | None,
                 shard: Shard):
        self.indices, self.start, self.stop, self.shard = indices, start, stop, shard
        self.order = Batches(len(indices), batch_size, seed)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start, self.stop) if self.stop is not None else itertools.count(self.start):
            epoch = it // self.order.per_epoch
            batch = self.order.indices(it)
            yield [(epoch, int(self.indices[i])) for i in batch[self.shard.part(len(batch))]]


def _seed_worker(worker_id: int) -> None:
    # torch is seeded per worker by the DataLoader from its generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _scan(folder: pathlib.Path):
    from torchvision.datasets import ImageFolder
    try:
        return ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{folder}: {exc}") from None


def _worker_error(exc: DataError) -> DataError:
    """A DataError raised in a DataLoader worker arrives with the worker's traceback in its message (first
    line 'Caught DataError in DataLoader worker process N.'): keep the original one-line reason."""
    last = str(exc).strip().splitlines()[-1]
    return DataError(last.split("DataError: ", 1)[-1])


class ImageFolderSource(BatchSource):
    """One trial's view of an ImageFolder dataset: streamed training batches and evaluation (module doc)."""

    top5 = True

    def __init__(self, name: str, folder: pathlib.Path, *, seeds: list[int], batch_size: int,
                 iterations: int | None = None, subset: int | None = None, validation: float = 0.0,
                 split_seed: int = 0, augment: bool = True, workers: int = 0, device: torch.device | str = "cpu",
                 shard: Shard = Shard(0, 1), train_crop: int = TRAIN_CROP,
                 eval_crops: dict[str, tuple[int, int]] | None = None, report_crop: str = REPORTED_CROP,
                 eval_batch: int = EVAL_BATCH):
        train, val = _scan(folder / "train"), _scan(folder / "val")
        if train.classes != val.classes:
            extra = sorted(set(train.classes) ^ set(val.classes))
            raise DataError(f"{folder}: train/ and val/ must hold the same class folders; "
                            f"{extra[0] if extra else 'their order'} differs")
        classes = DATASET_SHAPES[name][2]
        if len(train.classes) > classes:
            raise DataError(f"{folder}: {len(train.classes)} class folders, more than the {classes} outputs "
                            f"of a {name} network")
        eval_crops = eval_crops or EVAL_CROPS
        if report_crop not in eval_crops:
            raise ValueError(f"report_crop {report_crop!r} is not one of the evaluation crops {list(eval_crops)}")
        if batch_size % shard.world:
            raise DataError(f"batch_size {batch_size} does not split into {shard.world} equal shards")
        self.name, self.folder, self.classes = name, folder, train.classes
        self.seeds, self.batch_size, self.iterations, self.workers = seeds, batch_size, iterations, workers
        self.device, self.shard = torch.device(device), shard
        self.pin_memory = self.device.type == "cuda"
        self.samples = train.samples
        # Without augmentation, training images are cropped as the 224 evaluation is: centre, fixed.
        self.train_transform = train_transform(train_crop) if augment else eval_transform(
            round(train_crop * 256 / 224), train_crop)
        self.image_size = train_crop
        self.eval_crops, self.report_crop, self.eval_batch = eval_crops, report_crop, eval_batch

        n = len(train.samples)
        if subset is not None:
            if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or not 1 <= subset <= n:
                raise DataError(f"subset must be an integer from 1 to {n} (the {name} training set), got {subset!r}")
            # Evenly spaced over the class-sorted list, so every class keeps its share: the first N would be
            # the first classes only.
            chosen = np.arange(subset) * n // subset
        else:
            chosen = np.arange(n)
        if not 0.0 <= validation < 1.0:
            raise DataError(f"validation must be a fraction in [0, 1), got {validation}")
        n_val = round(validation * len(chosen))
        if validation > 0 and not 0 < n_val < len(chosen):
            raise DataError(f"validation={validation} of {len(chosen)} training examples leaves no "
                            f"{'validation' if n_val == 0 else 'training'} examples")
        if n_val:
            # As workers/data.py splits: a permutation from split_seed, both parts kept in folder order.
            order = np.random.default_rng(split_seed).permutation(len(chosen))
            self.eval_samples = [self.samples[i] for i in chosen[np.sort(order[:n_val])]]
            chosen = chosen[np.sort(order[n_val:])]
        else:
            self.eval_samples = val.samples
        self.evaluated_on = "validation" if n_val else "test"
        self.train_indices = chosen
        if len(chosen) < batch_size:
            raise DataError(f"the training set has {len(chosen)} examples, fewer than one batch of {batch_size}")
        self.per_epoch = len(chosen) // batch_size
        self.test_size = len(self.eval_samples)
        self._streams: dict[int, tuple[int, Iterator]] = {}  # slot → (next iteration, its batches)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_size(self) -> int:
        return len(self.train_indices)

    def _loader(self, dataset: Dataset, seed: int, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=self.workers, pin_memory=self.pin_memory,
                          worker_init_fn=_seed_worker if self.workers else None,
                          generator=torch.Generator().manual_seed(stream_seed(seed, STREAM_WORKERS)),
                          **kwargs)

    def _on_device(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        try:
            for x, y in batches:
                yield (x.to(self.device, non_blocking=self.pin_memory).contiguous(memory_format=torch.channels_last),
                       y.to(self.device, non_blocking=self.pin_memory))
        except DataError as exc:
            raise _worker_error(exc) from None

    def train_batches(self, slot: int, start: int, stop: int | None) -> Iterator[Batch]:
        """(x, y) of iterations start..stop-1 (None: on and on) of seed `seeds[slot]` (this shard's part),
        decoded ahead by the workers, on the device."""
        seed = self.seeds[slot]
        sampler = _EpochBatches(self.train_indices, self.batch_size, seed, start, stop, self.shard)
        return self._on_device(self._loader(_Images(self.samples, self.train_transform, seed), seed,
                                            batch_sampler=sampler))

    def train_batch(self, slot: int, iteration: int) -> Batch:
        expected, stream = self._streams.get(slot, (None, None))
        if expected != iteration:  # the first ask, or a jump: a stream from here to the end
            stream = self.train_batches(slot, iteration, self.iterations)
        self._streams[slot] = (iteration + 1, stream)
        return next(stream)

    def eval_batches(self, images: int | None = None) -> tuple[int, dict[str, Iterable[Batch]]]:
        """The evaluation set (all of it, or `images` evenly spaced ones) at every evaluation crop, in folder
        order, this shard's part; the reported crop's view is named "", the others by their crop."""
        samples = self.eval_samples
        if images is not None and images < len(samples):
            samples = [samples[i] for i in np.arange(images) * len(samples) // images]
        mine = samples[self.shard.part(len(samples))]
        views = {}
        for crop, (resize, size) in self.eval_crops.items():
            loader = self._loader(_Images(mine, eval_transform(resize, size)), self.seeds[0],
                                  batch_size=self.eval_batch)
            views["" if crop == self.report_crop else f"_{crop}"] = self._on_device(loader)
        return len(samples), views


def open_image_folder(name: str, *, seeds: list[int], batch_size: int, data_dir: str | os.PathLike | None = None,
                      **options) -> ImageFolderSource:
    """The named ImageFolder dataset under the data root, as one trial's source (options: see
    ImageFolderSource: iterations, subset, validation, split_seed, augment, workers, device, shard, crops,
    eval_batch)."""
    return ImageFolderSource(name, image_folder_dir(name, data_dir).resolve(), seeds=seeds, batch_size=batch_size,
                             **options)
