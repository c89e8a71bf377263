"""One training loop for every trial: the k ≥ 1 seeds of one configuration, trained as k channel groups of
one network (`build_model(spec, groups=k)`, see workers/fused.py). A solo trial is a group of one.

The loop is flat: batches come from the trial's batch source (workers/sources.py): a small dataset lives
on the device as uint8, each batch gathered, normalised and augmented there as whole-tensor ops
(`DeviceData`), and ImageNet streams from an image folder (workers/imagefolder.py). The learning rate is
set explicitly at every step.

Several workers of one trial (`distributed=True`) run this same loop, one per rank: DistributedDataParallel
wraps the model, and each rank's source yields its shard of the global batch.

Determinism: every random draw is a function of (seed, stream, index): initialisation of (seed),
the data order of (seed, epoch), augmentation of (seed, iteration), dropout masks of (the group's seeds,
iteration; and the rank, with several workers). So the iteration stored in a checkpoint is the whole
random state, and a resumed run repeats an uninterrupted one bit for bit on CPU (same thread count, same
precision, same compile decision, which the checkpoint keeps). On CUDA, cuDNN makes runs close, not
identical.

Each seed keeps its own result: its own batches, loss, gradient slice, optimizer state, checkpoints
(solo-shaped, so any seed resumes alone or in another group), metrics sink and result record.

Divergence is a result, not a crash. A seed diverges when its training loss is not finite, or exceeds
EXPLODED × ln(classes) (a hundred times the loss of chance: finite floats can explode too, and a network
whose loss is 1e17 predicts a constant). Its update is not applied, and it is scored in its last finite
state: the weights before the step and the BN running statistics before the diverging forward pass
(which has already moved them). The other seeds of a group go on.

Logging: training loss, error, learning rate and throughput every `log_every` iterations (the history,
deterministic), plus live points at least every `log_every_s` seconds (sink only); evaluations every
`eval_every` iterations, on `eval_images` images except the last, which reads the whole split.
Throughput is images over the wall time of the same window, evaluations and checkpoints included.
"""
from __future__ import annotations

import functools
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ablations import ModelSpec, build_model, count_macs
from ablations.resnet import join_states, split_state
from ablations.spec import dataset_model_fields

from .checkpoint import checkpoints, prepare_dir, readable, save_checkpoint, stored_result, write_result
from .config import TrialConfig
from .data import STREAMED, DataError, Dataset, load_dataset
from .fused import check_group, freeze, fused_model, join_optimizers, split_optimizer
from .imagefolder import open_image_folder
from .recipes import Recipe
from .sinks import MetricsSink, NullSink
from .sources import BatchSource, Shard, metrics, score
from .streams import STREAM_AUGMENT, STREAM_STEP, Batches
from .streams import stream_seed as _stream_seed

PAD = 4  # pad-4 random crop (He et al. 2016, CIFAR recipe)
EVAL_BATCH = 1000
# A loss above EXPLODED × ln(classes) is divergence: far beyond chance, no run comes back from it.
EXPLODED = 100.0
# torch.compile costs 23-31 s of first steps and gained 16% (fp32) and 22% (bf16) on a 2-core AMX Xeon
# (shared/NOTES.md): it pays beyond about 200 s of eager work. Work is counted in forward multiply-
# accumulates of the whole trial (images × MACs per image) so the decision is a function of the
# configuration and the kind of machine, never of a timing; 1e13 MACs is about 400 s of eager ResNet-20
# there. On CPUs without bf16 units no gain has been measured (bench/trainer.py), so they stay eager.
COMPILE_MIN_MACS = 1e13


class TrialTimeout(RuntimeError):
    """The attempt ran past its time limit."""


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------- precision
def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@functools.lru_cache(maxsize=1)
def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast trains faster than fp32 on this CPU: the CPU must report bf16 matrix units
    (AMX or AVX-512 BF16), and a one-time measurement of a convolution step must confirm it (measured:
    1.86× on AMX; on AVX2-only CPUs bf16 is emulated and about 10× slower)."""
    if not {"amx_bf16", "avx512_bf16"} & cpu_flags():
        return False
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(64, 32, 16, 16).contiguous(memory_format=torch.channels_last)

    def step_time(bf16: bool) -> float:
        best = math.inf
        for _ in range(4):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                conv(x).float().sum().backward()
            best = min(best, time.perf_counter() - start)
        return best

    return step_time(True) * 1.2 < step_time(False)


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision a trial runs in: `auto` becomes bf16 on CUDA devices with bf16 and on CPUs where it is
    measurably faster, fp32 elsewhere; fp32 and bf16 are taken as asked."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_bf16_pays() else "fp32"


def should_compile(requested: bool | None, device: torch.device, macs_per_image: int, recipe: Recipe) -> bool:
    """Compile when asked, or (None) when the trial's work earns the compile time back."""
    if requested is not None:
        return requested
    if device.type == "cuda":
        return True
    measured_gain = device.type == "cpu" and bool({"amx_bf16", "avx512_bf16"} & cpu_flags())
    return measured_gain and macs_per_image * recipe.batch_size * recipe.iterations >= COMPILE_MIN_MACS


# -------------------------------------------------------------------------------------------------- data
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


def seed_batch(train_x: torch.Tensor, train_y: torch.Tensor, batches: Batches, seed: int, iteration: int,
               mean: torch.Tensor, scale: float, augmented: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One seed's training batch at one iteration: the same images whatever group the seed trains in."""
    idx = batches.indices(iteration).to(train_x.device)
    xb = normalise(train_x[idx], mean, scale)
    if augmented:
        xb = augment(xb, torch.Generator().manual_seed(_stream_seed(seed, STREAM_AUGMENT, iteration)))
    return xb.contiguous(memory_format=torch.channels_last), train_y[idx]


def check_shapes(spec: ModelSpec, data: Dataset) -> None:
    if (spec.in_channels, spec.num_classes) != (data.in_channels, data.num_classes):
        raise DataError(f"model expects {spec.in_channels} channels and {spec.num_classes} classes, "
                        f"{data.name} has {data.in_channels} and {data.num_classes}")


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


def _chunks(x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, scale: float):
    """Evaluation batches of device-resident images, normalised."""
    return ((normalise(x[i:i + EVAL_BATCH], mean, scale), y[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH))


class DeviceData(BatchSource):
    """A dataset held on the device as uint8 (workers/data.py): every batch gathered, normalised and
    augmented there as whole-tensor ops. Sharded, each worker gathers and augments the whole global batch
    and keeps its part, so the shards are the images, crops and flips a single device trains on (a few
    tensor ops per step on 32×32 images, small beside the step)."""

    def __init__(self, config: TrialConfig, device: torch.device, data_dir: str | None, seeds: list[int],
                 shard: Shard | None):
        self.data, (self.train_x, self.train_y, self.eval_x, self.eval_y, self.mean, self.scale) = \
            device_data(config, device, data_dir)
        self.seeds, self.augment, self.shard = seeds, config.recipe.augment, shard
        self.batches = [Batches(len(self.train_x), config.recipe.batch_size, s) for s in seeds]
        self.train_size, self.test_size, self.image_size = len(self.train_x), len(self.eval_x), self.data.image_size
        self.evaluated_on = "validation" if self.data.val is not None else "test"

    def train_batch(self, slot: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        xb, yb = seed_batch(self.train_x, self.train_y, self.batches[slot], self.seeds[slot], iteration, self.mean,
                            self.scale, self.augment)
        if self.shard is None:
            return xb, yb
        part = self.shard.part(len(yb))
        return xb[part], yb[part]

    def eval_batches(self, images: int | None):
        n = len(self.eval_x) if images is None else min(images, len(self.eval_x))
        part = self.shard.part(n) if self.shard is not None else slice(0, n)
        return n, {"": _chunks(self.eval_x[part], self.eval_y[part], self.mean, self.scale)}


def open_source(config: TrialConfig, seeds: list[int], device: torch.device, data_dir: str | None,
                shard: Shard | None, threads: int) -> BatchSource:
    """The trial's batch source: streamed from an image folder (ImageNet), else held on the device."""
    recipe = config.recipe
    if config.dataset not in STREAMED:
        return DeviceData(config, device, data_dir, seeds, shard)
    # On a GPU the trial's CPUs decode images; on a CPU they train, and decoding shares their process.
    return open_image_folder(config.dataset, seeds=seeds, batch_size=recipe.batch_size, iterations=recipe.iterations,
                             data_dir=data_dir, subset=config.subset, validation=config.validation,
                             augment=recipe.augment, workers=threads if device.type == "cuda" else 0, device=device,
                             shard=shard or Shard(0, 1))


def trial_config(model_fields: dict[str, Any], dataset: str, recipe: Recipe, seed: int, subset: int | None = None,
                 validation: float = 0.0, workers: int = 1) -> TrialConfig:
    """A TrialConfig with the model's input and output shaped by the dataset."""
    from ablations import make_spec
    spec = make_spec(**{**model_fields, **dataset_model_fields(dataset)})
    return TrialConfig(model=spec, dataset=dataset, subset=subset, validation=validation, recipe=recipe, seed=seed,
                       workers=workers)


# ------------------------------------------------------------------------------------------- evaluation
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, scale: float,
             bf16: bool) -> list[tuple[float, float | None]]:
    """(error %, mean loss) of every copy of the model in evaluation mode (BN running statistics), each on
    the same device-resident images (workers/sources.py `score`); a loss that is not finite is None."""
    scored = metrics(score(model, _chunks(x, y, mean, scale), x.device, bf16))
    return [(m["test_error"], m["test_loss"]) for m in scored]


# ---------------------------------------------------------------------------------------------- windows
class Window:
    """Running sums of one averaging window, per seed (loss, misclassified images, images), and its own
    clock for throughput: images counted since `started` over the time since `started`."""

    def __init__(self, k: int, sums: list[list[float]] | None = None):
        self.sums = [list(s) for s in sums] if sums is not None else [[0.0, 0.0, 0] for _ in range(k)]
        self.started, self.timed_images = time.perf_counter(), 0

    def add(self, j: int, loss: float, wrong: float, images: int) -> None:
        s = self.sums[j]
        s[0] += loss * images
        s[1] += wrong
        s[2] += images

    def tick(self, images: int) -> None:
        self.timed_images += images

    def averages(self, j: int) -> dict[str, float]:
        loss, wrong, images = self.sums[j]
        elapsed = time.perf_counter() - self.started
        return {"train_loss": loss / images, "train_error": 100.0 * wrong / images,
                "img_per_s": self.timed_images / elapsed if elapsed > 0 else 0.0}

    def reset(self, slots: list[int]) -> None:
        for j in slots:
            self.sums[j] = [0.0, 0.0, 0]
        self.started, self.timed_images = time.perf_counter(), 0


# ------------------------------------------------------------------------------------------------- loop
def run_trial(config: TrialConfig, *, checkpoint_dir: str | os.PathLike | None = None,
              sink: MetricsSink | None = None, **options) -> dict[str, Any]:
    """One seed: `run_trials` with a group of one."""
    return run_trials([config], checkpoint_dirs=None if checkpoint_dir is None else [checkpoint_dir],
                      sinks=None if sink is None else [sink], **options)[0]


def run_trials(configs: list[TrialConfig], *, checkpoint_dirs: list[str | os.PathLike] | None = None,
               sinks: list[MetricsSink] | None = None, device: str | torch.device | None = None,
               threads: int | None = None, data_dir: str | None = None, compile_model: bool | None = None,
               time_limit_s: float | None = None, distributed: bool = False) -> list[dict[str, Any]]:
    """Train the seeds of one trial configuration together; one result record per config, in order.

    `checkpoint_dirs` and `sinks` have one entry per config when given. With checkpoints, a seed whose
    folder holds its result.json is not trained again (its record comes back), and the others resume from
    the newest iteration at which every one of them has a readable checkpoint (they are written at the
    same steps, so this is the last one unless the process died between two writes); sharing none, the
    group starts over, with a warning. `time_limit_s` bounds this attempt's wall time: past it,
    TrialTimeout is raised between two steps (checkpoints stay, so a retry resumes). `compile_model`:
    None decides by the trial's size (`should_compile`).

    `distributed`: this process is one rank of an initialised torch.distributed process group whose size
    is the configs' `workers` (workers/sources.py says how the ranks share a step); every rank calls
    run_trials with the same arguments, and rank 0 alone writes checkpoints and results and logs to its
    sinks (the others may pass sinks that discard).
    """
    seeds = check_group(configs)
    for name, given in (("checkpoint_dirs", checkpoint_dirs), ("sinks", sinks)):
        if given is not None and len(given) != len(configs):
            raise ValueError(f"{name} has {len(given)} entries for {len(configs)} configs")
    base = configs[0]
    recipe, spec = base.recipe, base.model
    device = pick_device(device)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    folders = [prepare_dir(d) for d in checkpoint_dirs] if checkpoint_dirs is not None else [None] * len(configs)
    sinks = list(sinks) if sinks is not None else [NullSink() for _ in configs]
    records = [c.model_dump(mode="json") for c in configs]

    results: dict[int, dict[str, Any]] = {}
    for i, (folder, record) in enumerate(zip(folders, records)):
        if (stored := stored_result(folder, record)) is not None:
            results[i] = stored
            sinks[i].close()
    todo = [i for i in range(len(configs)) if i not in results]
    if not todo:
        return [results[i] for i in range(len(configs))]
    shard = _shard(base, device) if distributed else None
    return _Loop(configs, todo, folders, sinks, records, device, data_dir, compile_model, time_limit_s,
                 results, shard, threads or os.cpu_count() or 1).run()


def _shard(config: TrialConfig, device: torch.device) -> Shard:
    """This rank's shard, checked against the trial's configuration."""
    import torch.distributed as dist
    shard = Shard(dist.get_rank(), dist.get_world_size())
    if shard.world != config.workers:
        raise ValueError(f"the trial splits its batch over {config.workers} workers; the process group has "
                         f"{shard.world}")
    if config.recipe.sync_bn and device.type != "cuda":
        raise ValueError("sync_bn needs CUDA devices: torch's SyncBatchNorm does not run on CPU")
    return shard


class _Loop:
    """The state of one run of the loop: the group's model and optimizer, and per seed its history and
    windows. `slot` j trains config `todo[j]`."""

    def __init__(self, configs, todo, folders, sinks, records, device, data_dir, compile_model, time_limit_s,
                 results, shard, threads):
        self.configs, self.todo, self.folders, self.sinks, self.records = configs, todo, folders, sinks, records
        self.results, self.device, self.shard = results, device, shard
        self.writes = shard is None or shard.rank == 0  # rank 0 alone writes checkpoints and results
        base = configs[0]
        self.recipe, self.spec, self.k = base.recipe, base.model, len(todo)
        self.seeds = [configs[i].seed for i in todo]
        self.source = open_source(base, self.seeds, device, data_dir, shard, threads)
        self.model = fused_model(self.spec, self.seeds).to(device, memory_format=torch.channels_last)
        if self.recipe.sync_bn:  # same parameters and buffers under the same names: checkpoints stay solo
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.recipe.lr, momentum=self.recipe.momentum,
                                         weight_decay=self.recipe.weight_decay, nesterov=self.recipe.nesterov)
        self.start, self.resumed_from = 0, None
        self.histories: list[list[dict[str, Any]]] = [[] for _ in todo]
        log_sums = None
        state = self._resume()
        if state is not None:
            self.precision, compiled = state["precision"], state["compiled"]
            log_sums = [s["window"] for s in state["seeds"]]
        else:
            self.precision = resolve_precision(self.recipe.precision, device)
            compiled = should_compile(compile_model, device, count_macs(build_model(self.spec), self.source.image_size),
                                      self.recipe)
            if shard is not None:  # rank 0 decides (bf16 may be a measurement): every rank runs alike
                decided = [self.precision, compiled]
                torch.distributed.broadcast_object_list(decided, src=0)
                self.precision, compiled = decided
        self.bf16 = self.precision == "bf16"
        self.log_window, self.live_window = Window(self.k, log_sums), Window(self.k)
        # DDP averages the ranks' gradients in the backward pass (each rank's loss is its shard's mean, so
        # the average is the global batch's gradient) and gives every rank rank 0's BN buffers at each
        # forward pass: BN normalises each rank's shard by its own statistics, as the paper's per-GPU BN.
        self.eager = self.model if shard is None else torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[device] if device.type == "cuda" else None)
        self.forward, self.compiled = self.eager, False
        if compiled:
            self.forward, self.compiled = torch.compile(self.eager), True
        self.deadline = time.monotonic() + time_limit_s if time_limit_s else math.inf
        self.time_limit_s = time_limit_s
        self.classes = self.spec.num_classes
        # BN running statistics before each forward pass: a diverging pass has already moved them.
        self.buffer_names, self.buffers = zip(*self.model.named_buffers())
        self.before = [b.clone() for b in self.buffers]

    def _resume(self) -> dict[str, Any] | None:
        """Load the newest checkpoint every seed has; returns its group-level fields, or None."""
        if self.folders[self.todo[0]] is None:
            return None
        found = [{int(s["iteration"]): s for s in readable(self.folders[i], self.records[i], self.device)}
                 for i in self.todo]
        common = set.intersection(*(set(f) for f in found))
        if not common:
            if any(found):
                warnings.warn(f"the seeds {self.seeds} share no checkpoint iteration: the group starts from "
                              f"iteration 0", stacklevel=4)
            elif any(checkpoints(self.folders[i]) for i in self.todo):
                warnings.warn(f"no readable checkpoint in {self.folders[self.todo[0]]}: starting from iteration 0",
                              stacklevel=4)
            return None
        self.start = self.resumed_from = max(common)
        states = [f[self.start] for f in found]
        self.model.load_state_dict(join_states([s["model"] for s in states]))
        self.optimizer.load_state_dict(join_optimizers([s["optimizer"] for s in states]))
        self.histories = [list(s["history"]) for s in states]
        return {"precision": states[0]["precision"], "compiled": states[0]["compiled"], "seeds": states}

    # ----------------------------------------------------------------------------------------- one run
    def run(self) -> list[dict[str, Any]]:
        recipe, k = self.recipe, self.k
        active = list(range(k))
        for j in active:
            self.sinks[self.todo[j]].begin(self.start, recipe.iterations)
        last_emit = time.monotonic()
        self.model.train()
        for it in range(self.start, recipe.iterations):
            if time.monotonic() > self.deadline:
                raise TrialTimeout(f"the trial ran past its time limit of {self.time_limit_s:g} s at iteration {it}")
            lr = recipe.lr_at(it)
            loss_values, wrong_counts, losses = self._forward(it, lr)
            stopped = [j for j in active if self._diverged(loss_values[j])]
            if stopped:
                self._stop(stopped, it, loss_values)
                active = [j for j in active if j not in stopped]
                if not active:
                    break
            total = losses[active].sum() if len(active) < k else losses.sum()
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            if stopped:
                freeze(self.model, self.optimizer, stopped, k)
            for j in active:
                for window in (self.log_window, self.live_window):
                    window.add(j, loss_values[j], wrong_counts[j], recipe.batch_size)
            for window in (self.log_window, self.live_window):
                window.tick(recipe.batch_size)
            done = it + 1
            logged = done % recipe.log_interval == 0 or done == recipe.iterations
            evaluated = done % recipe.eval_every == 0 or done == recipe.iterations
            if logged or evaluated:
                self._record(done, lr, active, logged, evaluated)
                last_emit = time.monotonic()
            elif time.monotonic() - last_emit >= recipe.log_every_s:
                for j in active:  # a live point: the sink only, never the history
                    self.sinks[self.todo[j]].log({**self.live_window.averages(j), "lr": lr}, step=done)
                self.live_window.reset(active)
                last_emit = time.monotonic()
            if done % recipe.checkpoint_every == 0 or done == recipe.iterations:
                self._checkpoint(done, active)
        for j in active:
            i = self.todo[j]
            self.sinks[i].close()
            self.results[i] = self._result(j, "finished", self.histories[j][-1], None)
        return [self.results[i] for i in range(len(self.configs))]

    def _forward(self, it: int, lr: float):
        """One forward pass of the group; per-seed losses as floats (one sync per step) and as a tensor."""
        k = self.k
        parts = [self.source.train_batch(j, it) for j in range(k)]
        xb = parts[0][0] if k == 1 else torch.cat([p[0] for p in parts], 1).contiguous(memory_format=torch.channels_last)
        yb = torch.stack([p[1] for p in parts], 1)  # [B, k]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Dropout shortcuts draw from here; each rank masks its own images.
        rank = () if self.shard is None else (self.shard.rank,)
        torch.manual_seed(_stream_seed(*self.seeds, STREAM_STEP, it, *rank))
        torch._foreach_copy_(self.before, self.buffers)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self._call(xb).float().unflatten(1, (k, -1))  # [B, k, classes]
            losses = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none").mean(0)  # [k]
        wrong = (logits.detach().argmax(2) != yb).sum(0)
        stats = torch.stack([losses.detach(), wrong.float()])
        if self.shard is not None:  # the global batch's: every rank takes the same decisions from them
            torch.distributed.all_reduce(stats)
            stats[0] /= self.shard.world
        loss_values, wrong_counts = stats.tolist()
        return loss_values, wrong_counts, losses

    def _call(self, xb: torch.Tensor) -> torch.Tensor:
        """The forward pass, compiled when chosen; a compilation that fails falls back to eager, once."""
        if not self.compiled:
            return self.eager(xb)
        try:
            return self.forward(xb)
        except Exception as exc:  # compilers fail in many ways (no C++ toolchain, unsupported ops): go eager
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                          f"training eagerly", stacklevel=2)
            self.forward, self.compiled = self.eager, False
            return self.eager(xb)

    def _diverged(self, loss: float) -> bool:
        return not math.isfinite(loss) or loss > EXPLODED * math.log(self.classes)

    def _stop(self, stopped: list[int], it: int, loss_values: list[float]) -> None:
        """Score diverged seeds in their last finite state and write their records."""
        # The model's buffers stay as they are (autograd saved them for this step's backward): each stopped
        # seed's solo state takes its statistics from the copy made before the forward pass.
        solo = split_state(self.model.state_dict(), self.k)
        before = dict(zip(self.buffer_names, self.before))
        for j in stopped:
            for name, tensor in before.items():
                solo[j][name] = tensor.clone() if tensor.dim() == 0 else tensor.chunk(self.k)[j].clone()
        for j in stopped:
            i = self.todo[j]
            # Scored alone, in a solo network: the result no longer depends on the group.
            alone = build_model(self.spec)
            alone.load_state_dict(solo[j])
            scores = self._evaluate(alone.to(self.device, memory_format=torch.channels_last), None)[1][0]
            self.sinks[i].log({k: v for k, v in scores.items() if v is not None}, step=it)
            self.sinks[i].close()
            loss = loss_values[j]
            reason = (f"training loss {loss:.4g} above {EXPLODED:g}·ln({self.classes}) = "
                      f"{EXPLODED * math.log(self.classes):.4g}" if math.isfinite(loss) else f"training loss {loss}")
            self.results[i] = self._result(j, "diverged", scores, it,
                                           {"iteration": it, "loss": loss if math.isfinite(loss) else str(loss),
                                            "reason": reason})

    def _record(self, done: int, lr: float, active: list[int], logged: bool, evaluated: bool) -> None:
        """A history entry per active seed: the log window's training metrics and, at evaluations, test ones.
        The log window closes before the evaluation, so evaluation time counts in the next window: windows
        tile the wall time, and each one's throughput is its images over its own time."""
        if logged:
            trained = {j: self.log_window.averages(j) for j in active}
            self.log_window.reset(active)
        if evaluated:
            last = done == self.recipe.iterations
            n, evals = self._evaluate(self.model, None if last else self.recipe.eval_images)
        for j in active:
            entry: dict[str, Any] = {"step": done}
            if logged:
                entry.update(trained[j], lr=lr)
            if evaluated:
                entry.update(evals[j], eval_images=n)
            self.histories[j].append(entry)
            self.sinks[self.todo[j]].log({k: v for k, v in entry.items() if k not in ("step", "eval_images")
                                          and v is not None}, step=done)
        self.live_window.reset(active)

    def _evaluate(self, model: torch.nn.Module, images: int | None) -> tuple[int, list[dict[str, float | None]]]:
        """(images evaluated, per copy of the model its test metrics) on the source's evaluation views:
        `images` of them, or all (None)."""
        if self.shard is not None:  # every rank scores its part of the images in rank 0's BN statistics
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, 0)
        n, views = self.source.eval_batches(images)
        out: list[dict[str, float | None]] = [{} for _ in range(getattr(model, "groups", 1))]
        for suffix, batches in views.items():
            sums = score(model, batches, self.device, self.bf16, self.source.top5, self.shard)
            for entry, scores in zip(out, metrics(sums, suffix)):
                entry.update(scores)
        return n, out

    def _checkpoint(self, done: int, active: list[int]) -> None:
        if self.folders[self.todo[0]] is None or not self.writes:
            return
        models, optims = split_state(self.model.state_dict(), self.k), split_optimizer(self.optimizer.state_dict(), self.k)
        for j in active:
            i = self.todo[j]
            save_checkpoint(self.folders[i], done, {"config": self.records[i], "model": models[j],
                                                    "optimizer": optims[j], "history": self.histories[j],
                                                    "window": self.log_window.sums[j], "precision": self.precision,
                                                    "compiled": self.compiled})

    def _result(self, j: int, status: str, scores: dict[str, Any], diverged_at: int | None,
                divergence: dict[str, Any] | None = None) -> dict[str, Any]:
        """A seed's result record, written to its folder as result.json; `scores`: its final evaluation."""
        i = self.todo[j]
        config, history = self.configs[i], self.histories[j]
        finished = status == "finished"
        trained = [h for h in history if "train_loss" in h]
        result = {
            "key": config.key(), "status": status, "test_error": scores["test_error"],
            # The top-1 error above and the top-5 error at the crop the paper reports (ImageNet-style data).
            **({"test_error_top5": scores["test_error_top5"]} if self.source.top5 else {}),
            # Training metrics of the final log window (the last `log_every` iterations): at the end of the
            # schedule, on the learning rate the test error is measured at.
            "train_loss": trained[-1]["train_loss"] if finished else None,
            "train_error": trained[-1]["train_error"] if finished else None,
            "iterations": self.recipe.iterations if finished else diverged_at, "diverged_at": diverged_at,
            "divergence": divergence, "resumed_from": self.resumed_from,
            "evaluated_on": self.source.evaluated_on, "test_size": self.source.test_size,
            "precision": self.precision, "compiled": self.compiled, "device": str(self.device),
            "fused": self.k, "history": history, "config": self.records[i],
        }
        folder = self.folders[i]
        if folder is not None and self.writes:
            write_result(folder, result)
        return result
