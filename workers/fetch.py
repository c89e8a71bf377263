"""`ablate data fetch`: the public datasets downloaded by torchvision's own downloaders, into the layout
workers/data.py reads, for machines without the Debian package. Nothing else in Ablate downloads: a run
only reads what is already on disk.

torchvision checks every download against the MD5 it ships (the archive, then CIFAR's extracted batches),
so a corrupt or substituted file is an error, never data. Where the files land under the root:
- fashion-mnist: `FashionMNIST/raw/` (torchvision's layout; the loader looks there too);
- cifar10, cifar100: `cifar-10-batches-py/`, `cifar-100-python/` (torchvision's layout; the archive is
  removed once its contents are verified).
A dataset the loader already finds under the root is not downloaded again; a failed fetch removes what
it wrote, so the loader never mistakes half a download for the dataset.
"""
from __future__ import annotations

import os
import pathlib
import shutil
from urllib.error import URLError

from .data import DataError, cifar_dir, data_root, fashion_mnist_dir

FETCHABLE = ("fashion-mnist", "cifar10", "cifar100")


def _dataset_class(name: str):
    from torchvision import datasets
    return {"fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]


def _found(name: str, root: pathlib.Path) -> pathlib.Path | None:
    """The folder the loader reads `name` from, if it lies under root (not the Debian copy)."""
    try:
        folder = fashion_mnist_dir(root) if name == "fashion-mnist" else cifar_dir(name, root)
    except DataError:
        return None
    return folder if folder == root or root in folder.parents else None


def _reason(exc: BaseException) -> str:
    """torchvision's error in one line: its mirror loop writes 'Error downloading F:', 'Tried M, got:', the
    error; a failed MD5 check says 'not found or corrupted'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if any("corrupted" in line for line in lines):
        return "a downloaded file does not match the MD5 checksum torchvision ships for it"
    return " ".join(line for line in lines if not line.startswith("Tried")) or type(exc).__name__


def fetch_dataset(name: str, data_dir: str | os.PathLike | None = None) -> dict:
    """Download `name` under the root (`data_dir`, else $ABLATE_DATA_DIR) unless the loader finds it there
    already. Returns what was done and where."""
    if name not in FETCHABLE:
        hint = (" (it has no public download: put an ImageFolder tree at <root>/imagenet/{train,val}/<class>/"
                "<image>)" if name == "imagenet" else "")
        raise DataError(f"cannot fetch {name!r}{hint}; fetchable: {', '.join(FETCHABLE)}")
    root = data_root(data_dir)
    if root is None:
        raise DataError("no destination: give --dir DIR or set ABLATE_DATA_DIR (the root the loaders read)")
    root = root.resolve()
    folder = _found(name, root)
    downloaded = folder is None
    if downloaded:
        cls = _dataset_class(name)
        written = [root / "FashionMNIST"] if name == "fashion-mnist" else [root / cls.base_folder, root / cls.filename]
        written = [path for path in written if not path.exists()]
        try:
            root.mkdir(parents=True, exist_ok=True)
            for train in (True, False):
                cls(str(root), train=train, download=True)
        except (RuntimeError, URLError, OSError) as exc:
            for path in written:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            raise DataError(f"cannot fetch {name} into {root}: {_reason(exc)}") from None
        if name != "fashion-mnist":
            (root / cls.filename).unlink(missing_ok=True)
        folder = _found(name, root)
        if folder is None:  # torchvision's layout and the loader's disagree: a bug here, not the user's
            raise RuntimeError(f"{name} was downloaded under {root} but the loader does not find it there")
    return {"dataset": name, "root": str(root), "folder": str(folder), "downloaded": downloaded,
            "use": f"ABLATE_DATA_DIR={root}"}
