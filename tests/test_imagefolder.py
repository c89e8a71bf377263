"""The streamed ImageFolder source (workers/imagefolder.py) on a small tree of real Fashion-MNIST images,
written as RGB JPEG and PNG files: deterministic batches, evaluation, the lighting noise and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ablations import build_model
from ablations.spec import dataset_model_fields
from workers.data import DataError, load_dataset
from workers.imagefolder import PCA_EIGVAL, PCA_EIGVEC, Lighting, _Images, open_image_folder

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
    return open_image_folder("imagenet", seed=seed, batch_size=8, data_dir=root, **{**SMALL, **options})


def test_batches_depend_on_seed_and_iteration_only(root):
    src = source(root)
    assert (src.train_size, src.per_epoch, src.num_classes, src.evaluated_on) == (40, 5, 10, "test")
    state = torch.get_rng_state()
    full = list(src.train_batches(0, 10))
    assert torch.equal(torch.get_rng_state(), state)  # decoding in this process left its generator alone
    x, y = full[0]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Two worker processes decode the same tensors as this process does, and a resumed stream continues it.
    parallel = list(source(root, workers=2).train_batches(0, 10))
    resumed = list(src.train_batches(7, 10))
    for (xa, ya), (xb, yb) in zip(full, parallel):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full[7:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Each epoch visits every training image once, in another order.
    for epoch in (full[:5], full[5:]):
        assert sorted(torch.cat([y for _, y in epoch]).tolist()) == sorted([c for c in range(10) for _ in range(4)])
    assert not torch.equal(torch.cat([y for _, y in full[:5]]), torch.cat([y for _, y in full[5:]]))
    other = next(iter(source(root, seed=1).train_batches(0, 1)))
    assert not torch.equal(other[0], x)


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
    out = src.evaluate(Constant(), "cpu")
    # Balanced val set of 10 classes: class 0 is right for 1 in 10, classes 0-4 for half.
    assert out["test_error"] == pytest.approx(90.0) and out["test_error_top5"] == pytest.approx(50.0)
    assert out["test_error_16"] == pytest.approx(90.0) and out["test_error_top5_16"] == pytest.approx(50.0)
    assert set(out) == {"test_error", "test_error_top5", "test_loss", "test_error_16", "test_error_top5_16",
                        "test_loss_16"}
    torch.manual_seed(0)
    model = build_model(depth=18, width=4, **dataset_model_fields("imagenet")).train()
    out = src.evaluate(model, "cpu")
    assert model.training and 0 <= out["test_error_top5"] <= out["test_error"] <= 100


def test_subset_and_validation_split(root):
    src = source(root, subset=20, validation=0.25)
    assert (src.train_size, len(src.eval_samples), src.evaluated_on) == (15, 5, "validation")
    train = {src.samples[i][0] for i in src.train_indices}
    assert train.isdisjoint(path for path, _ in src.eval_samples)
    # Evenly spaced over the class-sorted files: every class keeps its share.
    assert sorted({src.samples[i][1] for i in np.arange(20) * 40 // 20}) == list(range(10))


def test_the_root_itself_may_hold_train_and_val(tmp_path):
    write_tree(tmp_path, {"train": 1, "val": 1})
    assert open_image_folder("imagenet", seed=0, batch_size=2, data_dir=tmp_path, **SMALL).train_size == 10


def test_missing_data_names_the_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("ABLATE_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"no data root set; expected <root>/imagenet/train/<class>/<image>"):
        open_image_folder("imagenet", seed=0, batch_size=8)
    with pytest.raises(DataError) as info:
        open_image_folder("imagenet", seed=0, batch_size=8, data_dir=tmp_path)
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
        open_image_folder("imagenet", seed=0, batch_size=2, data_dir=tmp_path, **SMALL)
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_names_its_file(tmp_path, workers):
    write_tree(tmp_path / "imagenet", {"train": 1, "val": 1})
    bad = next((tmp_path / "imagenet/train/05-class").iterdir())
    bad.write_bytes(b"not an image")
    src = open_image_folder("imagenet", seed=0, batch_size=10, data_dir=tmp_path, workers=workers, **SMALL)
    with pytest.raises(DataError) as info:
        list(src.train_batches(0, 1))
    assert str(info.value).startswith(f"{bad}: cannot read the image") and "\n" not in str(info.value)


@pytest.mark.parametrize("options,needle", [
    (dict(subset=41), "subset must be an integer from 1 to 40"),
    (dict(validation=0.99), "leaves no training examples"),
    (dict(subset=4), "fewer than one batch of 8"),
])
def test_bad_splits(root, options, needle):
    with pytest.raises(DataError, match=needle):
        source(root, **options)
