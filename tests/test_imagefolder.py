"""The streamed ImageFolder source (workers/imagefolder.py) on a small tree of real Fashion-MNIST images,
written as RGB JPEG and PNG files: deterministic and sharded batches, evaluation, the lighting noise, the
errors, and an ImageNet trial streamed through the one training loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ablations import build_model
from ablations.spec import dataset_model_fields
from workers.data import DataError, load_dataset
from workers.imagefolder import PCA_EIGVAL, PCA_EIGVEC, Lighting, _Images, open_image_folder
from workers.recipes import resolve_recipe
from workers.sources import Shard, metrics, score
from workers.trainer import run_trial, trial_config

CLASSES = 10
PER_CLASS = {"train": 4, "val": 2}
SMALL = dict(train_crop=16, eval_crops={"16": (18, 16), "24": (24, 24)}, report_crop="24")


def write_tree(folder, per_class=PER_CLASS):
    """class folders `NN-name` of 28×28 Fashion-MNIST images as RGB files, JPEG and PNG alternating."""
    data = load_dataset("fashion-mnist")  # the Debian package's real images
    images, labels = data.train.x[:, 0].numpy(), data.train.y.numpy()
    taken = 0
    for split, count in per_class.items():
        for label in range(CLASSES):
            place = folder / split / f"{label:02d}-class"
            place.mkdir(parents=True)
            for i, index in enumerate(np.flatnonzero(labels == label)[taken:taken + count]):
                suffix = "JPEG" if i % 2 == 0 else "png"
                Image.fromarray(images[index]).convert("RGB").save(place / f"{split}_{index}.{suffix}")
        taken += count
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    write_tree(base / "imagenet")
    return base


def source(root, seed=0, **options):
    return open_image_folder("imagenet", seeds=[seed], batch_size=8, data_dir=root, **{**SMALL, **options})


def evaluate(src, model, images=None):
    """Every evaluation view of the source scored as the trainer scores it: one dict of metrics."""
    n, views = src.eval_batches(images)
    out = {}
    for suffix, batches in views.items():
        out.update(metrics(score(model, batches, torch.device("cpu"), False, top5=src.top5), suffix)[0])
    return n, out


def test_batches_depend_on_seed_and_iteration_only(root):
    src = source(root)
    assert (src.train_size, src.per_epoch, src.num_classes, src.evaluated_on) == (40, 5, 10, "test")
    state = torch.get_rng_state()
    full = list(src.train_batches(0, 0, 10))
    assert torch.equal(torch.get_rng_state(), state)  # decoding in this process left its generator alone
    x, y = full[0]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Two worker processes decode the same tensors as this process does, and a resumed stream continues it.
    parallel = list(source(root, workers=2).train_batches(0, 0, 10))
    resumed = list(src.train_batches(0, 7, 10))
    for (xa, ya), (xb, yb) in zip(full, parallel):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full[7:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Each epoch visits every training image once, in another order.
    for epoch in (full[:5], full[5:]):
        assert sorted(torch.cat([y for _, y in epoch]).tolist()) == sorted([c for c in range(10) for _ in range(4)])
    assert not torch.equal(torch.cat([y for _, y in full[:5]]), torch.cat([y for _, y in full[5:]]))
    other = next(iter(source(root, seed=1).train_batches(0, 0, 1)))
    assert not torch.equal(other[0], x)
    # The loop's view: consecutive iterations from any start, a jump restarts the stream there.
    for it in (3, 4, 5, 8):
        xb, yb = src.train_batch(0, it)
        assert torch.equal(xb, full[it][0]) and torch.equal(yb, full[it][1])
        assert xb.is_contiguous(memory_format=torch.channels_last)


def test_shards_split_every_global_batch_in_rank_order(root):
    """Two workers decode the halves of the batch one device would train on: the same images, crops and
    flips (each image's transform draws from (seed, epoch, index), not from the rank)."""
    whole = list(source(root).train_batches(0, 0, 6))
    halves = [list(source(root, shard=Shard(rank, 2)).train_batches(0, 0, 6)) for rank in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert len(y0) == len(y1) == 4
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(DataError, match="batch_size 8 does not split into 3 equal shards"):
        source(root, shard=Shard(0, 3))
    # Evaluation images too: the parts cover the set once, in order.
    n, views = source(root).eval_batches()
    parts = [source(root, shard=Shard(rank, 2)).eval_batches()[1][""] for rank in (0, 1)]
    assert n == 20 and torch.equal(torch.cat([y for part in parts for _, y in part]),
                                   torch.cat([y for _, y in views[""]]))


def test_augmentation_draws_per_seed_epoch_and_index(root):
    src = source(root)
    images = _Images(src.samples, src.train_transform, seed=0)
    a, label = images[(0, 3)]
    assert torch.equal(images[(0, 3)][0], a) and label == src.samples[3][1]
    assert not torch.equal(images[(1, 3)][0], a)  # another epoch: another crop, jitter, lighting, flip
    assert not torch.equal(_Images(src.samples, src.train_transform, seed=1)[(0, 3)][0], a)


def test_lighting_noise_has_the_pca_covariance():
    """Per image one RGB offset Σ_j v_j α_j λ_j, α ~ N(0, 0.1²): its covariance is V diag((0.1 λ)²) Vᵀ."""
    torch.manual_seed(0)
    lighting = Lighting()
    offsets = torch.stack([lighting(torch.zeros(3, 2, 2)) for _ in range(8_000)])
    assert torch.equal(offsets[:, :, 0, 0], offsets[:, :, 1, 1])  # the same offset on every pixel
    v, lam = torch.tensor(PCA_EIGVEC), torch.tensor(PCA_EIGVAL)
    expected = v @ torch.diag((0.1 * lam) ** 2) @ v.T
    measured = torch.cov(offsets[:, :, 0, 0].T)
    torch.testing.assert_close(measured, expected, atol=2e-5, rtol=0.05)
    assert torch.equal(Lighting(alphastd=0)(torch.ones(3, 1, 1)), torch.ones(3, 1, 1))


class Constant(torch.nn.Module):
    """Logits 1000, 999, …: classes 0-4 are the top five for every image."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.arange(1000, 0, -1).float())

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_evaluate_reports_top1_and_top5_at_every_crop(root):
    src = source(root)
    n, out = evaluate(src, Constant())
    # Balanced val set of 10 classes: class 0 is right for 1 in 10, classes 0-4 for half.
    assert out["test_error"] == pytest.approx(90.0) and out["test_error_top5"] == pytest.approx(50.0)
    assert out["test_error_16"] == pytest.approx(90.0) and out["test_error_top5_16"] == pytest.approx(50.0)
    assert set(out) == {"test_error", "test_error_top5", "test_loss", "test_error_16", "test_error_top5_16",
                        "test_loss_16"}
    assert n == 20
    torch.manual_seed(0)
    model = build_model(depth=18, width=8, **dataset_model_fields("imagenet")).train()
    _, out = evaluate(src, model)
    assert model.training and 0 <= out["test_error_top5"] <= out["test_error"] <= 100
    # An intermediate evaluation on 10 images takes every other one: every class keeps its share.
    n, views = src.eval_batches(10)
    assert n == 10 and sorted(torch.cat([y for _, y in views[""]]).tolist()) == list(range(10))


def test_subset_and_validation_split(root):
    src = source(root, subset=20, validation=0.25)
    assert (src.train_size, len(src.eval_samples), src.evaluated_on) == (15, 5, "validation")
    train = {src.samples[i][0] for i in src.train_indices}
    assert train.isdisjoint(path for path, _ in src.eval_samples)
    # Evenly spaced over the class-sorted files: every class keeps its share.
    assert sorted({src.samples[i][1] for i in np.arange(20) * 40 // 20}) == list(range(10))


def test_the_root_itself_may_hold_train_and_val(tmp_path):
    write_tree(tmp_path, {"train": 1, "val": 1})
    assert open_image_folder("imagenet", seeds=[0], batch_size=2, data_dir=tmp_path, **SMALL).train_size == 10


def test_missing_data_names_the_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("ABLATE_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"no data root set; expected <root>/imagenet/train/<class>/<image>"):
        open_image_folder("imagenet", seeds=[0], batch_size=8)
    with pytest.raises(DataError) as info:
        open_image_folder("imagenet", seeds=[0], batch_size=8, data_dir=tmp_path)
    assert f"imagenet not found: expected {tmp_path}/imagenet/train/<class>/<image>" in str(info.value)
    with pytest.raises(DataError, match="streamed from disk"):
        load_dataset("imagenet", data_dir=tmp_path)


@pytest.mark.parametrize("damage,needle", [
    (lambda f: (f / "imagenet/val/09-class").rename(f / "imagenet/val/09-other"), "same class folders; 09-class"),
    (lambda f: [p.unlink() for p in (f / "imagenet/train/03-class").iterdir()], "Found no valid file"),
])
def test_broken_trees_are_one_line_errors(tmp_path, damage, needle):
    write_tree(tmp_path / "imagenet", {"train": 1, "val": 1})
    damage(tmp_path)
    with pytest.raises(DataError) as info:
        open_image_folder("imagenet", seeds=[0], batch_size=2, data_dir=tmp_path, **SMALL)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_names_its_file(tmp_path, workers):
    write_tree(tmp_path / "imagenet", {"train": 1, "val": 1})
    bad = next((tmp_path / "imagenet/train/05-class").iterdir())
    bad.write_bytes(b"not an image")
    src = open_image_folder("imagenet", seeds=[0], batch_size=10, data_dir=tmp_path, workers=workers, **SMALL)
    with pytest.raises(DataError) as info:
        list(src.train_batches(0, 0, 1))
    assert str(info.value).startswith(f"{bad}: cannot read the image") and "\n" not in str(info.value)


@pytest.mark.parametrize("options,needle", [
    (dict(subset=41), "subset must be an integer from 1 to 40"),
    (dict(validation=0.99), "leaves no training examples"),
    (dict(subset=4), "fewer than one batch of 8"),
])
def test_bad_splits(root, options, needle):
    with pytest.raises(DataError, match=needle):
        source(root, **options)


def test_an_imagenet_trial_streams_through_the_one_loop(root, tmp_path):
    """ResNet-18 on the ImageNet plan, fed at its 224 crops from the folder (width 8: torch 2.14's CPU
    1×1 stride-2 convolution corrupts memory in channels_last below 8 input channels). Top-1 and top-5
    at the reported 320 crop are the result, the 224 crop's are in the history; a run resumed from its
    checkpoint at iteration 2 repeats the uninterrupted one."""
    recipe = resolve_recipe("smoke", {"iterations": 3, "batch_size": 4, "milestones": [], "eval_every": 3,
                                      "checkpoint_every": 2, "log_every": 1})
    config = trial_config(dict(depth=18, width=8), "imagenet", recipe, 0, subset=20)
    folder = tmp_path / "ckpt"
    result = run_trial(config, checkpoint_dir=folder, data_dir=root, threads=2)
    assert (result["status"], result["test_size"], result["evaluated_on"]) == ("finished", 20, "test")
    last = result["history"][-1]
    assert (result["test_error"], result["test_error_top5"]) == (last["test_error"], last["test_error_top5"])
    assert {"test_error_224", "test_error_top5_224", "test_loss_224"} <= set(last)
    assert 0 <= result["test_error_top5"] <= result["test_error"] <= 100
    (folder / "result.json").unlink()
    (folder / "ckpt-000000003.pt").unlink()
    again = run_trial(config, checkpoint_dir=folder, data_dir=root, threads=2)
    assert again["resumed_from"] == 2
    strip = [{k: v for k, v in h.items() if k != "img_per_s"} for h in result["history"]]
    assert [{k: v for k, v in h.items() if k != "img_per_s"} for h in again["history"]] == strip
