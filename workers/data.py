"""Datasets for the trainer: decoded from local files into uint8 NCHW tensors, never downloaded.

`load_dataset(name, ...)` returns train, test and an optional validation split carved from the training
set, plus the per-pixel training mean that the paper subtracts. The root folder is `data_dir`, else
`$ABLATE_DATA_DIR`; Fashion-MNIST also falls back to the Debian package `dataset-fashion-mnist`.
`ablate data fetch` (workers/fetch.py) downloads the first three below into this layout.

- cifar10 / cifar100: torchvision's on-disk layout, read with a restricted unpickler (no code runs).
- fashion-mnist: the four IDX files, gzipped or not, parsed and validated here.
- synthetic: generated from a fixed seed; learnable by a small CNN in a few hundred steps.
- imagenet: too large to hold in memory; streamed from an ImageFolder tree (workers/imagefolder.py).

Decoded datasets are cached per process as read-only numpy arrays, keyed by name and folder, so repeated
trials in one worker read files once (files changed on disk meanwhile are not re-read); every call
builds fresh tensors, so callers cannot write into the cache.
"""
from __future__ import annotations

import functools
import gzip
import os
import pathlib
import pickle
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ablations.spec import excerpt
from ablations.vocabulary import DATASET_SHAPES

STREAMED = ("imagenet",)  # read by workers/imagefolder.py, never loaded whole
DEBIAN_FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_FASHION_MNIST = pathlib.Path("FashionMNIST", "raw")  # under the root: torchvision's download
FASHION_MNIST_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
                       "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
# name → (folder under the root, training files, test file, label key, classes)
CIFAR_LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", 10),
    "cifar100": ("cifar-100-python", ("train",), "test", "fine_labels", 100),
}
SYNTHETIC_SEED = 20160316  # arXiv date of "Identity Mappings in Deep Residual Networks"
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 5000, 1000
SYNTHETIC_SHIFT = 3  # pixels each way; with the noise, no single pixel gives the class away
SYNTHETIC_CONTRAST = 60.0  # standard deviation of the class templates, in pixel units
SYNTHETIC_NOISE = 40.0  # per-pixel standard deviation of the noise added to each image

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, train y, test x, test y


class DataError(ValueError):
    """A dataset cannot be found, read or split as asked; the message is one line."""


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    val: Split | None  # carved from the training set when validation > 0
    num_classes: int
    in_channels: int
    image_size: int
    mean: torch.Tensor  # float32 [C, H, W]: per-pixel mean of `train` (after subset and split), 0..255 units


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, subset: int | None = None,
                 validation: float = 0.0, split_seed: int = 0) -> Dataset:
    """The named dataset; `subset` keeps the first N training examples, then `validation` moves a
    fraction of them, chosen by a permutation drawn from `split_seed`, into `val`."""
    if name not in DATASET_SHAPES:
        raise DataError(f"unknown dataset {excerpt(name)}; choose one of: {', '.join(DATASET_SHAPES)}")
    if name in STREAMED:
        raise DataError(f"{name} is streamed from disk (workers/imagefolder.py), not loaded into memory")
    if not 0.0 <= validation < 1.0:
        raise DataError(f"validation must be a fraction in [0, 1), got {excerpt(validation)}")
    folder = dataset_folder(name, data_dir)
    train_x, train_y, test_x, test_y = _load_arrays(name, None if folder is None else str(folder))

    n = len(train_x)
    if subset is not None:
        if isinstance(subset, bool) or not isinstance(subset, (int, np.integer)) or not 1 <= subset <= n:
            raise DataError(f"subset must be an integer from 1 to {n} (the {name} training set), got {excerpt(subset)}")
        n = int(subset)
    n_val = round(validation * n)
    if validation > 0 and not 0 < n_val < n:
        raise DataError(f"validation={validation} of {n} training examples leaves "
                        f"{'no validation' if n_val == 0 else 'no training'} examples")
    if n_val:
        order = np.random.default_rng(split_seed).permutation(n)
        # Sorted, so both splits keep the file order: the training set stays a "first N" selection.
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        val = _split(train_x[val_idx], train_y[val_idx])
        train = _split(train_x[train_idx], train_y[train_idx])
    else:
        val = None
        train = _split(train_x[:n].copy(), train_y[:n].copy())

    # Summed in int64 from uint8: exact, and no float copy of the whole training set.
    mean = train.x.numpy().sum(axis=0, dtype=np.int64) / len(train.x)
    channels, size, classes = DATASET_SHAPES[name]
    return Dataset(name=name, train=train, test=_split(test_x.copy(), test_y.copy()), val=val,
                   num_classes=classes, in_channels=channels, image_size=size,
                   mean=torch.from_numpy(mean.astype(np.float32)))


def dataset_folder(name: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The absolute folder a dataset's files are read from (None for `synthetic`, which is generated);
    absolute, so a relative root read from two working directories cannot collide in the cache."""
    if name == "synthetic":
        return None
    if name in STREAMED:
        return image_folder_dir(name, data_dir).resolve()
    return (fashion_mnist_dir(data_dir) if name == "fashion-mnist" else cifar_dir(name, data_dir)).resolve()


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    """Tensors over arrays the caller owns (already copied off the cache)."""
    return Split(x=torch.from_numpy(x), y=torch.from_numpy(y.astype(np.int64)))


def data_root(data_dir: str | os.PathLike | None) -> pathlib.Path | None:
    """The datasets root: `data_dir`, else $ABLATE_DATA_DIR, else None."""
    chosen = data_dir or os.environ.get("ABLATE_DATA_DIR") or None
    return pathlib.Path(chosen).expanduser() if chosen is not None else None


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


@functools.lru_cache(maxsize=4)
def _load_arrays(name: str, folder: str | None) -> Arrays:
    """Decoded full dataset, keyed by name and resolved folder; arrays are read-only as they are shared."""
    if name == "synthetic":
        arrays = _synthetic()
    elif name == "fashion-mnist":
        arrays = _read_fashion_mnist(pathlib.Path(folder))
    else:
        arrays = _read_cifar(name, pathlib.Path(folder))
    for a in arrays:
        a.flags.writeable = False
    return arrays


# --- Fashion-MNIST ------------------------------------------------------------------------------------------
def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The folder the Fashion-MNIST IDX files are read from: `<root>/fashion-mnist/`, `<root>/`,
    `<root>/FashionMNIST/raw/` (torchvision's layout, what `ablate data fetch` writes), then the Debian
    package's folder. The first that holds any of the four files is used, and must hold all four, so a
    half-copied folder is an error rather than a silent switch to another copy."""
    root = data_root(data_dir)
    places = ([root / "fashion-mnist", root, root / TORCHVISION_FASHION_MNIST] if root is not None else []) + [
        DEBIAN_FASHION_MNIST]
    for place in places:
        found = {stem: _idx_file(place, stem) for stem in FASHION_MNIST_FILES.values()}
        if any(found.values()):
            missing = [stem for stem, path in found.items() if path is None]
            if missing:
                raise DataError(f"Fashion-MNIST folder {place} lacks {', '.join(missing)} (.gz or uncompressed)")
            return place
    raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, places))}: run `apt-get install "
                    f"dataset-fashion-mnist` or `ablate data fetch fashion-mnist --dir DIR` with ABLATE_DATA_DIR=DIR, "
                    f"or put the four IDX files ({', '.join(FASHION_MNIST_FILES.values())}, .gz or not) in "
                    f"$ABLATE_DATA_DIR/fashion-mnist/")


def _idx_file(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_fashion_mnist(folder: pathlib.Path) -> Arrays:
    paths = {key: _idx_file(folder, stem) for key, stem in FASHION_MNIST_FILES.items()}
    arrays = []
    for part in ("train", "test"):
        images, labels = read_idx(paths[f"{part}_x"], ndim=3), read_idx(paths[f"{part}_y"], ndim=1)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{paths[f'{part}_x']}: images are {images.shape[1]}×{images.shape[2]}, expected 28×28")
        if len(images) != len(labels):
            raise DataError(f"{paths[f'{part}_x']} has {len(images)} images but {paths[f'{part}_y']} "
                            f"has {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise DataError(f"{paths[f'{part}_y']}: label {labels.max()} outside 0..9")
        arrays += [images[:, None], labels.astype(np.int64)]
    return tuple(arrays)


def read_idx(path: pathlib.Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000_08_<ndim>, then <ndim> big-endian uint32 sizes, then
    the data), gzipped or not; anything else is a DataError naming the file."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # by content, not suffix: a renamed file still reads
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if len(raw) < 4:
        raise DataError(f"{path}: truncated, {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise DataError(f"{path}: bad magic number 0x{magic:08x}, expected 0x{0x0800 + ndim:08x} "
                        f"(IDX, unsigned bytes, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header, {len(raw)} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: {'truncated' if len(raw) - header < expected else 'trailing bytes'}: "
                        f"{len(raw) - header} data bytes for dimensions {dims}, expected {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# --- CIFAR ---------------------------------------------------------------------------------------------------
def cifar_dir(name: str, data_dir: str | os.PathLike | None) -> pathlib.Path:
    folder_name, train_files, test_file, _, _ = CIFAR_LAYOUTS[name]
    layout = f"<root>/{folder_name}/{{{','.join(train_files + (test_file,))}}}"
    how = (f"this is torchvision's format, what `ablate data fetch {name} --dir ROOT` writes on a machine with "
           f"internet; the root comes from $ABLATE_DATA_DIR or the grid's data_dir")
    root = data_root(data_dir)
    if root is None:
        raise DataError(f"{name}: no data root set; expected {layout} ({how})")
    folder = root / folder_name
    if not folder.is_dir():
        raise DataError(f"{name} not found: expected {layout.replace('<root>', str(root))} ({how})")
    missing = [f for f in train_files + (test_file,) if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: {folder} lacks {', '.join(missing)} ({how})")
    return folder


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled numpy uint8 array needs, so a crafted file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),  # numpy 1 / 2
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 0-2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return super().find_class(module, name)


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


def _read_cifar(name: str, folder: pathlib.Path) -> Arrays:
    _, train_files, test_file, label_key, classes = CIFAR_LAYOUTS[name]
    train = [_read_cifar_batch(folder / f, label_key, classes) for f in train_files]
    test_x, test_y = _read_cifar_batch(folder / test_file, label_key, classes)
    return np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y


def _read_cifar_batch(path: pathlib.Path, label_key: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: {data: uint8 [N, 3072] as R, G, B planes of 32×32 rows, <label_key>: [N]}."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes" reads the original Python 2 pickles; keys then arrive as bytes.
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise DataError(f"{path}: refused, the pickle references {exc}, which a CIFAR batch never does") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    except Exception as exc:  # any failure to unpickle means a corrupt or truncated file
        raise DataError(f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape [N, 3072]")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels.size} {label_key!r}")
    if labels.size and not 0 <= labels.min() <= labels.max() < classes:
        raise DataError(f"{path}: {label_key!r} outside 0..{classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


# --- synthetic -----------------------------------------------------------------------------------------------
def _synthetic() -> Arrays:
    """Class templates of random low-frequency colour waves; an image is its class template seen through
    a window shifted by up to SYNTHETIC_SHIFT pixels, plus Gaussian pixel noise. No wave is constant, so
    the class is in the spatial pattern rather than the average colour."""
    _, size, classes = DATASET_SHAPES["synthetic"]
    shift, waves = SYNTHETIC_SHIFT, 4
    rng = np.random.default_rng(SYNTHETIC_SEED)
    coords = np.arange(size + 2 * shift) / size
    # Plane waves of one cycle across the image along each axis, either sign: smooth enough that the
    # tests' depth-8, width-4 network gets under 25% error in 150 steps (chance: 90%).
    freq = rng.choice([-1, 1], size=(classes, 3, waves, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(classes, 3, waves))
    amp = rng.uniform(0.5, 1.0, size=(classes, 3, waves))
    angle = (2 * np.pi * (freq[..., 0, None, None] * coords[:, None] + freq[..., 1, None, None] * coords)
             + phase[..., None, None])
    templates = (amp[..., None, None] * np.cos(angle)).sum(axis=2)  # [classes, 3, size + 2 shift, ...]
    templates = (templates * (SYNTHETIC_CONTRAST / templates.std())).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(templates, (size, size), axis=(2, 3))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % classes)  # balanced: n / classes per class
        dy, dx = rng.integers(0, 2 * shift + 1, size=(2, n))
        images = rng.standard_normal(size=(n, 3, size, size), dtype=np.float32)
        images *= SYNTHETIC_NOISE
        images += windows[labels, :, dy, dx]  # [n, 3, size, size]
        images += 128.0
        return np.clip(np.rint(images, out=images), 0, 255, out=images).astype(np.uint8), labels.astype(np.int64)

    return *draw(SYNTHETIC_TRAIN), *draw(SYNTHETIC_TEST)
