"""One trial: train a residual network under a recipe and a seed, checkpointed and resumable.

The loop is flat: the dataset lives on the device as uint8, each batch is gathered, normalised and
augmented there as whole-tensor ops, and the learning rate is set explicitly at every step.

Determinism: every random draw is a function of (seed, stream, index): initialisation of (seed),
the data order of (seed, epoch), augmentation and dropout of (seed, iteration). So the iteration stored
in a checkpoint is the whole random state, and a resumed run repeats an uninterrupted one bit for bit
on CPU (same thread count). On CUDA, cuDNN and bf16 make runs close, not identical.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from ablations import ModelSpec, build_model
from ablations.spec import dataset_model_fields

from .checkpoint import load_latest, prepare_dir, save_checkpoint
from .config import TrialConfig
from .data import DataError, Dataset, load_dataset
from .recipes import Recipe
from .sinks import MetricsSink, NullSink
from .streams import STREAM_AUGMENT, STREAM_STEP, Batches
from .streams import stream_seed as _stream_seed

PAD = 4  # pad-4 random crop (He et al. 2016, CIFAR recipe)
EVAL_BATCH = 1000


class TrialTimeout(RuntimeError):
    """The attempt ran past its time limit."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def normalise(x: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 images → float, per-pixel mean subtracted (the paper), divided by the pixel spread."""
    return (x.float() - mean) * scale


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pad 4 with zeros (= the mean pixel after normalisation), random crop back, random horizontal flip."""
    b, _, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (b,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * PAD + 1, (b,), generator=gen).to(x.device)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    # Advanced indexing puts the gathered dims first: (B, H, W, C); the permute is channels_last.
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def check_shapes(spec: ModelSpec, data: Dataset) -> None:
    if (spec.in_channels, spec.num_classes) != (data.in_channels, data.num_classes):
        raise DataError(f"model expects {spec.in_channels} channels and {spec.num_classes} classes, "
                        f"{data.name} has {data.in_channels} and {data.num_classes}")


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, scale: float,
             autocast: bool) -> tuple[float, float]:
    """(error %, mean loss) of the model in evaluation mode (BN running statistics)."""
    model.eval()
    wrong, loss = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for i in range(0, len(x), EVAL_BATCH):
        xb = normalise(x[i:i + EVAL_BATCH], mean, scale).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(xb).float()
        wrong += (logits.argmax(1) != y[i:i + EVAL_BATCH]).sum()
        loss += F.cross_entropy(logits, y[i:i + EVAL_BATCH], reduction="sum")
    model.train()
    return 100.0 * float(wrong) / len(x), float(loss) / len(x)


def device_data(config: TrialConfig, device: torch.device, data_dir: str | None):
    """The dataset resident on the device: train and report (validation, else test) splits, the per-pixel
    mean and the normalising scale. Tuning reads the validation split, never the test set."""
    data = load_dataset(config.dataset, data_dir=data_dir, subset=config.subset, validation=config.validation)
    check_shapes(config.model, data)
    report = data.val if data.val is not None else data.test
    sample = data.train.x[:10_000].float() - data.mean
    scale = 1.0 / max(float(sample.std()), 1e-6)
    return data, (data.train.x.to(device), data.train.y.to(device), report.x.to(device), report.y.to(device),
                  data.mean.to(device), scale)


def trial_config(model_fields: dict[str, Any], dataset: str, recipe: Recipe, seed: int, subset: int | None = None,
                 validation: float = 0.0) -> TrialConfig:
    """A TrialConfig with the model's input and output shaped by the dataset."""
    from ablations import make_spec
    spec = make_spec(**{**model_fields, **dataset_model_fields(dataset)})
    return TrialConfig(model=spec, dataset=dataset, subset=subset, validation=validation, recipe=recipe, seed=seed)


def run_trial(config: TrialConfig, *, checkpoint_dir: str | os.PathLike | None = None, sink: MetricsSink | None = None,
              device: str | torch.device | None = None, threads: int | None = None, data_dir: str | None = None,
              compile_model: bool | None = None, time_limit_s: float | None = None) -> dict[str, Any]:
    """Train one trial to the end (or to divergence) and return its result record.

    `time_limit_s` bounds this attempt's wall time: past it, TrialTimeout is raised between two steps
    (checkpoints already written stay, so a retry resumes).

    With `checkpoint_dir`, resumes from the newest readable checkpoint of the same configuration and
    writes one every `checkpoint_every` iterations plus `result.json` at the end.
    """
    recipe, spec, sink = config.recipe, config.model, sink or NullSink()
    device = pick_device(device)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    cuda = device.type == "cuda"
    folder = prepare_dir(checkpoint_dir) if checkpoint_dir is not None else None
    config_record = config.model_dump(mode="json")

    data, (train_x, train_y, eval_x, eval_y, mean, scale) = device_data(config, device, data_dir)

    torch.manual_seed(config.seed)
    model = build_model(spec).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=recipe.nesterov)
    start, history, window, resumed_from = 0, [], [0.0, 0.0, 0], None
    if folder is not None:
        state = load_latest(folder, config_record, device)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start = resumed_from = int(state["iteration"])
            history, window = list(state["history"]), list(state["window"])
    forward = torch.compile(model) if (cuda if compile_model is None else compile_model) else model
    batches = Batches(len(train_x), recipe.batch_size, config.seed)

    status, diverged_at = "finished", None
    window_start, window_images = time.perf_counter(), 0
    deadline = time.monotonic() + time_limit_s if time_limit_s else math.inf
    model.train()
    for it in range(start, recipe.iterations):
        if time.monotonic() > deadline:
            raise TrialTimeout(f"the trial ran past its time limit of {time_limit_s:g} s at iteration {it}")
        idx = batches.indices(it).to(device)
        gen = torch.Generator().manual_seed(_stream_seed(config.seed, STREAM_AUGMENT, it))
        xb = normalise(train_x[idx], mean, scale)
        xb = augment(xb, gen) if recipe.augment else xb.contiguous(memory_format=torch.channels_last)
        yb = train_y[idx]
        lr = recipe.lr_at(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(_stream_seed(config.seed, STREAM_STEP, it))  # dropout shortcuts draw from here
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = forward(xb).float()
            loss = F.cross_entropy(logits, yb)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            # The update is not applied: the weights stay the last finite ones, and are evaluated below.
            status, diverged_at = "diverged", it
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window[0] += loss_value * len(yb)
        window[1] += float((logits.detach().argmax(1) != yb).sum())
        window[2] += len(yb)
        window_images += len(yb)
        done = it + 1
        if done % recipe.eval_every == 0 or done == recipe.iterations:
            elapsed = time.perf_counter() - window_start
            test_error, test_loss = evaluate(model, eval_x, eval_y, mean, scale, cuda)
            record = {"train_loss": window[0] / window[2], "train_error": 100.0 * window[1] / window[2],
                      "test_error": test_error, "test_loss": test_loss, "lr": lr,
                      "img_per_s": window_images / elapsed if elapsed > 0 else 0.0}
            history.append({"step": done, **record})
            sink.log(record, step=done)
            window, window_images = [0.0, 0.0, 0], 0
            window_start = time.perf_counter()
        if folder is not None and (done % recipe.checkpoint_every == 0 or done == recipe.iterations):
            save_checkpoint(folder, done, {"config": config_record, "model": model.state_dict(),
                                           "optimizer": optimizer.state_dict(), "history": history,
                                           "window": window})
            window_start = time.perf_counter()

    if status == "diverged":
        test_error, test_loss = evaluate(model, eval_x, eval_y, mean, scale, cuda)
        sink.log({"test_error": test_error, "test_loss": test_loss}, step=diverged_at)
        final_train_loss = None  # the loss that diverged is not a number
    else:
        final_train_loss, test_error = history[-1]["train_loss"], history[-1]["test_error"]
    sink.close()
    result = {
        "key": config.key(), "status": status, "test_error": test_error, "train_loss": final_train_loss,
        "train_error": history[-1]["train_error"] if history and status == "finished" else None,
        "iterations": diverged_at if status == "diverged" else recipe.iterations, "diverged_at": diverged_at,
        "resumed_from": resumed_from, "evaluated_on": "validation" if data.val is not None else "test",
        "device": str(device), "history": history, "config": config_record,
    }
    if folder is not None:
        (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result
