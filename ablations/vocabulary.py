"""The words every layer shares, each defined once: trial statuses, metrics, datasets, and the checks on a
dataset name and a data folder that grid specs, tuning specs and `ablate train` all apply.

Here, at the bottom of the import order (`ablations/` imports nothing of ours), so the trainer, the state
store, the scheduler, the statistics and the pages all read the same tuple instead of keeping their own.
"""
from __future__ import annotations

import reprlib
from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import AfterValidator, Field

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 40, 40, 30
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 5
_SHORT.maxdict = 3


def excerpt(value: Any, limit: int = 80) -> str:
    """`value` as repr() shows it, cut to at most `limit` characters without building the whole repr:
    every error message that echoes an input goes through here, and an input can be megabytes."""
    try:
        text = _SHORT.repr(value)
    except ValueError:  # an int too long for str(): no excerpt of it exists
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


# A trial's life: queued → running → finished, diverged or error (or queued again for a retry); a queued or
# running trial of a cancelled grid → cancelled. Submitting the grid again queues its error and cancelled trials.
STATUSES = ("queued", "running", "finished", "diverged", "error", "cancelled")
ACTIVE = ("queued", "running")             # not ended: someone still has to run it
ENDED = ("finished", "diverged", "error")  # ended with a run behind it: a result, or an error after the retries
MEASURED = ("finished", "diverged")        # ended with a result: a diverged run was still evaluated

# What a comparison may be made on: a trial's final values, stored as result columns (errors in %).
# test_error is the top-1 error; test_error_top5, the top-5 error, is reported on ImageNet-style data only.
METRICS = ("test_error", "test_error_top5", "train_loss", "train_error")
# What a trial's history records hold at its log points, and so what its MLflow run holds, step by step.
# ImageNet-style trials add the top-5 error, and the second evaluation crop's errors and loss under the
# crop's name (workers/imagefolder.py).
HISTORY_METRICS = ("train_loss", "train_error", "test_error", "test_loss", "lr", "img_per_s", "test_error_top5",
                   "test_error_224", "test_error_top5_224", "test_loss_224")

# Input channels, image size and classes per dataset: the stem and classifier follow the data.
DATASET_SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "fashion-mnist": (1, 28, 10),
                  "synthetic": (3, 32, 10), "imagenet": (3, 224, 1000)}
# Training-set sizes: an epoch-based recipe becomes iterations with these (ILSVRC-2012: 1,281,167 images).
DATASET_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "fashion-mnist": 60_000, "synthetic": 5_000,
                 "imagenet": 1_281_167}
# Test-set sizes: the binomial sampling error of a test error is sqrt(p(1 − p) / N_test) (ILSVRC-2012: the
# 50,000 validation images the paper reports on).
TEST_SIZES = {"cifar10": 10_000, "cifar100": 10_000, "fashion-mnist": 10_000, "synthetic": 1_000,
              "imagenet": 50_000}


def check_dataset(name: str) -> str:
    """`name` when it is a dataset Ablate reads, else ValueError listing them."""
    if name not in DATASET_SHAPES:
        raise ValueError(f"unknown dataset {excerpt(name)}; choose one of: {', '.join(DATASET_SHAPES)}")
    return name


def check_data_dir(path: str) -> str:
    """`path` when every node of a cluster resolves it to the same folder: absolute, without '..'.

    POSIX rules on every client, since the workers that read the folder run Linux."""
    if "\x00" in path:
        raise ValueError(f"data_dir holds a NUL byte, which no path can: {excerpt(path)}")
    if not PurePosixPath(path).is_absolute():
        raise ValueError(f"data_dir must be an absolute path (every node resolves it alike), got {excerpt(path)}")
    if ".." in PurePosixPath(path).parts:
        raise ValueError(f"data_dir must be an absolute path without '..' (every node resolves it alike), "
                         f"got {excerpt(path)}")
    return path


# The two as field types of the spec models (grid, tuning study): pydantic runs the check on the value.
def first_line(exc: BaseException) -> str:
    """An exception's message in one line, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


DatasetName = Annotated[str, AfterValidator(check_dataset)]
DataDir = Annotated[str, AfterValidator(check_data_dir)]
# The first N training examples: at most the largest training set, so a huge number is refused where it is
# read instead of reaching arithmetic that cannot hold it (a grid also checks it against its dataset's size).
Subset = Annotated[int, Field(ge=1, le=max(DATASET_SIZES.values()))]
