"""Checkpoints written atomically and read defensively.

A checkpoint is one file `ckpt-<iteration>.pt` holding the model, the optimizer, the iteration, the
metric accumulators and history, and the resolved trial configuration. Writes go to a temporary file
that is fsynced and renamed, so a crash at any instant leaves either the old or the new file whole.
Loading uses `torch.load(weights_only=True)` (no code runs from a checkpoint); a corrupt or truncated
file is skipped with a warning in favour of the previous one.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from ablations.vocabulary import MEASURED

if TYPE_CHECKING:
    import torch  # imported where used: the grid driver lists checkpoints and must not load torch (3-4 s)

KEEP = 2  # the newest two: one can be mid-write when the process dies, the other is whole
_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(ValueError):
    """The checkpoint folder cannot be used (unwritable, or it belongs to another trial)."""


def prepare_dir(path: str | os.PathLike) -> Path:
    """Create the folder and prove it is writable before any training time is spent."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A probe of its own: the ranks of a multi-worker trial prepare the same folder at once.
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(f"checkpoint folder {folder} is not writable: {exc.strerror or exc}") from None
    return folder


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_whole(final: Path, write: Callable[[IO[bytes]], None]) -> None:
    """`final` whole or not at all: written to a temporary file beside it, synced, then moved in place, so a
    worker killed while writing (its driver SIGKILLed) never leaves a truncated file under the final name."""
    tmp = final.with_name(f".{final.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def save_checkpoint(folder: Path, iteration: int, state: dict[str, Any]) -> Path:
    final = folder / f"ckpt-{iteration:09d}.pt"
    import torch
    _write_whole(final, lambda fh: torch.save({**state, "iteration": iteration}, fh))
    for old in checkpoints(folder)[KEEP:]:
        old.unlink(missing_ok=True)
    return final


def checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), reverse=True)


def readable(folder: Path, config: dict[str, Any], device: torch.device) -> Iterator[dict[str, Any]]:
    """This configuration's readable checkpoints, newest first: weights only, a corrupt or truncated file
    skipped with a warning (never half a state), another trial's files refused (CheckpointError)."""
    import torch
    for path in checkpoints(folder):
        try:
            state = torch.load(path, map_location=device, weights_only=True)
            if not isinstance(state, dict) or not {"model", "optimizer", "iteration", "config"} <= set(state):
                raise ValueError("missing fields")
        except Exception as exc:  # any unreadable file: skip it
            warnings.warn(f"skipping unreadable checkpoint {folder.name}/{path.name} (corrupt or truncated: "
                          f"{type(exc).__name__}); trying an older one", stacklevel=3)
            continue
        if state["config"] != config:
            raise CheckpointError(f"checkpoint folder {folder} holds another trial's checkpoints "
                                  f"({path.name}); use a fresh folder for this configuration")
        yield state


def write_result(folder: Path, result: dict[str, Any]) -> None:
    """result.json, whole or not at all: a truncated record would make the finished trial train again."""
    _write_whole(folder / "result.json", lambda fh: fh.write(json.dumps(result, indent=1).encode()))


def stored_result(folder: Path | None, config: dict[str, Any]) -> dict[str, Any] | None:
    """The result.json a previous attempt wrote for this configuration when it ended (finished or
    diverged): such a trial is not trained again."""
    if folder is None or not (folder / "result.json").is_file():
        return None
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("config") == config and result.get("status") in MEASURED else None
