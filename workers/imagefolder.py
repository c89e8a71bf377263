"""ImageNet-style data streamed from disk: an ImageFolder tree decoded and augmented by DataLoader workers.

ImageNet cannot live on the device as the small datasets do (workers/data.py): 1.28M JPEGs of about
110 KB each. `open_image_folder` returns an `ImageFolderSource`, one trial's view of the tree:
- `train_batches(start, stop)`: the (x, y) batches of iterations start..stop-1, x float32 [B, 3, crop,
  crop] normalised, y int64 [B], in the trainer's order (workers/streams.py `Batches`): epoch e is a
  permutation drawn from (seed, e), the last partial batch of an epoch dropped. Resuming at iteration k
  is `train_batches(k, stop)`: the same batches an uninterrupted run sees from k on.
- `evaluate(model, device)`: top-1 and top-5 error % and the loss on the evaluation set, for every
  evaluation crop; `test_error` and `test_error_top5` are the reported crop's (the paper's single 320
  crop), the others carry the crop in their name (`test_error_224`, `test_error_top5_224`).

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

import os
import pathlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ablations.spec import DATASET_SHAPES

from .data import DataError, data_root
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
    """Keys (epoch, folder index) of iterations [start, stop), in the order of `Batches` over `indices`."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int, start: int, stop: int):
        self.indices, self.start, self.stop = indices, start, stop
        self.order = Batches(len(indices), batch_size, seed)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start, self.stop):
            epoch = it // self.order.per_epoch
            yield [(epoch, int(self.indices[i])) for i in self.order.indices(it)]


def _seed_worker(worker_id: int) -> None:
    # torch is seeded per worker by the DataLoader from its generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def image_folder_dir(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """`<root>/<name>/` when it holds train/ and val/, else `<root>/` itself when it does; else a DataError
    that names the layout."""
    root = data_root(data_dir)
    layout = f"<root>/{name}/train/<class>/<image> and <root>/{name}/val/<class>/<image>"
    how = "root = $ABLATE_DATA_DIR or the grid's data_dir; ImageNet has no public download"
    if root is None:
        raise DataError(f"{name}: no data root set; expected {layout} ({how})")
    for place in (root / name, root):
        if (place / "train").is_dir() and (place / "val").is_dir():
            return place
    raise DataError(f"{name} not found: expected {layout.replace('<root>', str(root))} ({how})")


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


class ImageFolderSource:
    """One trial's view of an ImageFolder dataset: streamed training batches and evaluation (module doc)."""

    def __init__(self, name: str, folder: pathlib.Path, *, seed: int, batch_size: int, subset: int | None = None,
                 validation: float = 0.0, split_seed: int = 0, workers: int = 0, pin_memory: bool = False,
                 train_crop: int = TRAIN_CROP, eval_crops: dict[str, tuple[int, int]] | None = None,
                 report_crop: str = REPORTED_CROP, eval_batch: int = EVAL_BATCH):
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
        self.name, self.folder, self.classes = name, folder, train.classes
        self.seed, self.batch_size, self.workers, self.pin_memory = seed, batch_size, workers, pin_memory
        self.samples = train.samples
        self.train_transform = train_transform(train_crop)
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_size(self) -> int:
        return len(self.train_indices)

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(dataset, num_workers=self.workers, pin_memory=self.pin_memory,
                          worker_init_fn=_seed_worker if self.workers else None,
                          generator=torch.Generator().manual_seed(stream_seed(self.seed, STREAM_WORKERS)),
                          **kwargs)

    def train_batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of iterations start..stop-1, decoded ahead by the workers."""
        sampler = _EpochBatches(self.train_indices, self.batch_size, self.seed, start, stop)
        loader = self._loader(_Images(self.samples, self.train_transform, self.seed), batch_sampler=sampler)
        try:
            yield from loader
        except DataError as exc:
            raise _worker_error(exc) from None

    def eval_batches(self, crop: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The evaluation set in folder order at one evaluation crop."""
        resize, size = self.eval_crops[crop]
        loader = self._loader(_Images(self.eval_samples, eval_transform(resize, size)), batch_size=self.eval_batch)
        try:
            yield from loader
        except DataError as exc:
            raise _worker_error(exc) from None

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, device: torch.device | str, autocast: bool = False) -> dict[str, float]:
        """Top-1 and top-5 error % and mean loss per evaluation crop, the model in evaluation mode; the
        reported crop's are `test_error`, `test_error_top5` and `test_loss`, the others are suffixed
        with the crop's name."""
        device = torch.device(device)
        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            for crop in self.eval_crops:
                wrong1 = wrong5 = loss = 0.0
                count = 0
                for x, y in self.eval_batches(crop):
                    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                    y = y.to(device, non_blocking=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        logits = model(x).float()
                    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    hit = top == y[:, None]
                    wrong1 += float((~hit[:, 0]).sum())
                    wrong5 += float((~hit.any(dim=1)).sum())
                    loss += float(F.cross_entropy(logits, y, reduction="sum"))
                    count += len(y)
                suffix = "" if crop == self.report_crop else f"_{crop}"
                out.update({f"test_error{suffix}": 100.0 * wrong1 / count,
                            f"test_error_top5{suffix}": 100.0 * wrong5 / count, f"test_loss{suffix}": loss / count})
        finally:
            model.train(was_training)
        return out


def open_image_folder(name: str, *, seed: int, batch_size: int, data_dir: str | os.PathLike | None = None,
                      **options) -> ImageFolderSource:
    """The named ImageFolder dataset under the data root, as one trial's source (options: see
    ImageFolderSource: subset, validation, split_seed, workers, pin_memory, crops, eval_batch)."""
    return ImageFolderSource(name, image_folder_dir(name, data_dir).resolve(), seed=seed, batch_size=batch_size,
                             **options)
