"""The dataset layer: IDX and CIFAR files written here in their real formats, the errors users see, the
restricted unpickler, the synthetic set, and subset / validation splitting."""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from ablations.vocabulary import DATASET_SHAPES
from workers import data
from workers.data import DataError, fashion_mnist_dir, load_dataset, read_idx


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("ABLATE_DATA_DIR", raising=False)


def write_idx(path, array, magic=None, gz=False):
    header = (magic if magic is not None else 0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fashion(folder, n_train=6, n_test=4, gz=True):
    """Four IDX files with distinct images; returns (train images, train labels, test images, test labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10,
              rng.integers(0, 256, (n_test, 28, 28)), np.arange(n_test) % 10)
    suffix = ".gz" if gz else ""
    for stem, array in zip(data.FASHION_MNIST_FILES.values(), arrays):
        write_idx(folder / f"{stem}{suffix}", array, gz=gz)
    return arrays


def cifar_batch(n, label_key, classes, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"test batch", label_key: [int(v) for v in rng.integers(0, classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


def write_cifar10(root, per_batch=2, n_test=3, protocol=2):
    """The torchvision layout; protocol 2 is what the original Python 2 files use."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {f"data_batch_{i}": cifar_batch(per_batch, b"labels", 10, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n_test, b"labels", 10, 9)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return batches


# --- Fashion-MNIST / IDX -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x", images, gz=gz), ndim=3), images)
    labels = np.array([7, 0, 9])
    assert np.array_equal(read_idx(write_idx(tmp_path / "y", labels, gz=gz), ndim=1), labels)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_data_dir(tmp_path, gz):
    train_x, train_y, test_x, test_y = write_fashion(tmp_path / "fashion-mnist", gz=gz)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.train.x.shape == (6, 1, 28, 28) and ds.test.x.shape == (4, 1, 28, 28) and ds.val is None
    assert np.array_equal(ds.train.x[:, 0].numpy(), train_x) and np.array_equal(ds.train.y.numpy(), train_y)
    assert np.array_equal(ds.test.x[:, 0].numpy(), test_x) and np.array_equal(ds.test.y.numpy(), test_y)


def test_fashion_mnist_resolution_order(tmp_path, monkeypatch):
    write_fashion(tmp_path, gz=False)  # in the root itself
    assert fashion_mnist_dir(tmp_path) == tmp_path
    write_fashion(tmp_path / "fashion-mnist")  # the subfolder comes first
    assert fashion_mnist_dir(tmp_path) == tmp_path / "fashion-mnist"
    monkeypatch.setenv("ABLATE_DATA_DIR", str(tmp_path))
    assert fashion_mnist_dir() == tmp_path / "fashion-mnist"
    monkeypatch.delenv("ABLATE_DATA_DIR")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path)
    assert fashion_mnist_dir() == tmp_path


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "root")
    message = str(info.value)
    for needle in (str(tmp_path / "root" / "fashion-mnist"), str(tmp_path / "root"), str(debian),
                   "apt-get install dataset-fashion-mnist", "$ABLATE_DATA_DIR/fashion-mnist/",
                   "train-images-idx3-ubyte"):
        assert needle in message
    assert "\n" not in message


def test_fashion_mnist_half_copied_folder_is_an_error(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        fashion_mnist_dir(tmp_path)


def corrupt_bad_magic(folder):
    write_idx(folder / "train-images-idx3-ubyte.gz", np.zeros((6, 28, 28)), magic=0x0801, gz=True)
    return "train-images-idx3-ubyte.gz", "bad magic number"


def corrupt_truncated(folder):
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    return "t10k-images-idx3-ubyte.gz", "truncated"


def corrupt_truncated_gzip(folder):
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    return "train-labels-idx1-ubyte.gz", "cannot read"


def corrupt_count_mismatch(folder):
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(5), gz=True)
    return "train-labels-idx1-ubyte.gz", "6 images but"


@pytest.mark.parametrize("corrupt", [corrupt_bad_magic, corrupt_truncated, corrupt_truncated_gzip,
                                     corrupt_count_mismatch])
def test_fashion_mnist_bad_files(tmp_path, corrupt):
    write_fashion(tmp_path)
    file_name, problem = corrupt(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert file_name in str(info.value) and problem in str(info.value)


# --- CIFAR ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL, 5])
def test_cifar10_layout_and_pixels(tmp_path, protocol):
    batches = write_cifar10(tmp_path, protocol=protocol)
    # A known pixel: second image of data_batch_3, green channel, row 5, column 7.
    batches["data_batch_3"][b"data"][1, 1 * 1024 + 5 * 32 + 7] = 201
    batches["data_batch_3"][b"data"][1, 1 * 1024 + 5 * 32 + 6] = 13
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps(batches["data_batch_3"], protocol=protocol))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
    assert ds.train.x.shape == (10, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.train.x[2 * 2 + 1, 1, 5, 7] == 201 and ds.train.x[2 * 2 + 1, 1, 5, 6] == 13
    expected_y = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert ds.train.y.tolist() == expected_y and ds.test.y.tolist() == batches["test_batch"][b"labels"]
    assert np.array_equal(ds.test.x.numpy().reshape(3, 3072), batches["test_batch"][b"data"])


def python2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote the real files: str as BINSTRING, numpy.core.multiarray globals."""
    def string(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + len(b).to_bytes(4, "little") + b

    def integer(v):
        return b"J" + v.to_bytes(4, "little", signed=True)

    dtype = (b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R(" + integer(3) + string(b"|")
             + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
             + b"\x87R(" + integer(1) + integer(data.shape[0]) + integer(data.shape[1]) + b"\x86" + dtype + b"\x89"
             + string(data.tobytes()) + b"tb")
    return (b"\x80\x02}(" + string(b"data") + array + string(b"labels") + b"](" + b"".join(map(integer, labels))
            + b"eu.")


def test_cifar10_python2_pickles(tmp_path):
    batches = write_cifar10(tmp_path)
    for name, batch in batches.items():
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(python2_batch(batch[b"data"], batch[b"labels"]))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert np.array_equal(ds.test.x.numpy().reshape(3, 3072), batches["test_batch"][b"data"])
    assert ds.test.y.tolist() == batches["test_batch"][b"labels"] and ds.train.x.shape == (10, 3, 32, 32)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = cifar_batch(7, b"fine_labels", 100, 1), cifar_batch(2, b"fine_labels", 100, 2)
    train[b"coarse_labels"] = [0] * 7
    for name, batch in (("train", train), ("test", test)):
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (100, 3, 32)
    assert ds.train.y.tolist() == train[b"fine_labels"] and ds.test.x.shape == (2, 3, 32, 32)
    assert np.array_equal(ds.train.x.numpy().reshape(7, 3072), train[b"data"])


@pytest.mark.parametrize("name,folder,files", [
    ("cifar10", "cifar-10-batches-py", ("data_batch_1", "data_batch_5", "test_batch")),
    ("cifar100", "cifar-100-python", ("train", "test")),
])
def test_cifar_missing_folder_names_the_layout(tmp_path, monkeypatch, name, folder, files):
    for root in (tmp_path, None):  # a root without the folder, and no root at all
        with pytest.raises(DataError) as info:
            load_dataset(name, data_dir=root)
        message = str(info.value)
        assert all(needle in message for needle in (folder, *files, "torchvision", "$ABLATE_DATA_DIR", "data_dir"))
        assert "\n" not in message
    monkeypatch.setenv("ABLATE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path / folder)):
        load_dataset(name)


def test_cifar_missing_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="lacks data_batch_4"):
        load_dataset("cifar10", data_dir=tmp_path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    batch = cifar_batch(2, b"labels", 10, 1)
    batch[b"labels"] = RunsCode(marker)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match=r"data_batch_2: refused.*(posix|os)\.system"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("damage,problem", [
    (lambda raw: raw[:len(raw) // 2], "corrupt or truncated"),
    (lambda raw: pickle.dumps([1, 2, 3]), "expected a pickled dict"),
    (lambda raw: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}), "2 images but 1"),
    (lambda raw: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}), "outside 0..9"),
    (lambda raw: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}), "[N, 3072]"),
])
def test_cifar_bad_batch_names_the_file(tmp_path, damage, problem):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert str(path) in str(info.value) and problem in str(info.value)


# --- synthetic -----------------------------------------------------------------------------------------------
def test_synthetic_shape_balance_and_determinism():
    torch.manual_seed(123)
    np.random.seed(123)
    a = load_dataset("synthetic")
    data._load_arrays.cache_clear()  # regenerate, so this checks the generator and not the cache
    torch.manual_seed(7)
    np.random.seed(7)
    b = load_dataset("synthetic")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y) and torch.equal(a.test.x, b.test.x)
    assert a.train.x.shape == (5000, 3, 32, 32) and a.test.x.shape == (1000, 3, 32, 32)
    assert a.train.x.dtype == torch.uint8 and a.train.y.dtype == torch.int64
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 3, 32)
    assert torch.bincount(a.train.y).tolist() == [500] * 10 and torch.bincount(a.test.y).tolist() == [100] * 10


def test_synthetic_class_is_in_the_spatial_pattern():
    ds = load_dataset("synthetic")
    x, y, xt = ds.train.x.float(), ds.train.y, ds.test.x.float()

    def class_means(feature):
        return torch.stack([feature(x[y == c]).mean(0) for c in range(10)])

    def nearest_mean_accuracy(feature):
        pred = torch.cdist(feature(xt).flatten(1), class_means(feature).flatten(1)).argmin(1)
        return float((pred == ds.test.y).float().mean())

    assert nearest_mean_accuracy(lambda v: v) > 0.9  # a class template is there to learn
    assert nearest_mean_accuracy(lambda v: v.mean((2, 3))) < 0.3  # the average colour does not give it away
    assert float((xt - class_means(lambda v: v)[ds.test.y]).std()) > 30  # noisy: no image is its template


def test_returned_tensors_do_not_alias_the_cache():
    first = load_dataset("synthetic", subset=100)
    first.train.x.zero_()
    first.test.x.zero_()
    again = load_dataset("synthetic", subset=100)
    assert again.train.x.any() and again.test.x.any()


# --- subset, validation, mean --------------------------------------------------------------------------------
def test_subset_takes_the_first_examples():
    full, sub = load_dataset("synthetic"), load_dataset("synthetic", subset=300)
    assert torch.equal(sub.train.x, full.train.x[:300]) and torch.equal(sub.train.y, full.train.y[:300])
    assert torch.equal(sub.test.x, full.test.x)


@pytest.mark.parametrize("subset", [0, -1, 5001, True, 2.5])
def test_subset_out_of_range(subset):
    with pytest.raises(DataError, match="subset must be an integer from 1 to 5000"):
        load_dataset("synthetic", subset=subset)


def test_validation_split_is_a_seeded_carve_of_the_subset():
    sub = load_dataset("synthetic", subset=200)
    ds = load_dataset("synthetic", subset=200, validation=0.25, split_seed=3)
    assert len(ds.val.x) == 50 and len(ds.train.x) == 150
    rows = {bytes(img.numpy()): i for i, img in enumerate(sub.train.x)}
    train_rows = [rows[bytes(img.numpy())] for img in ds.train.x]
    val_rows = [rows[bytes(img.numpy())] for img in ds.val.x]
    assert sorted(train_rows + val_rows) == list(range(200)) and train_rows == sorted(train_rows)
    assert torch.equal(ds.val.y, sub.train.y[val_rows])
    same = load_dataset("synthetic", subset=200, validation=0.25, split_seed=3)
    other = load_dataset("synthetic", subset=200, validation=0.25, split_seed=4)
    assert torch.equal(same.val.x, ds.val.x) and not torch.equal(other.val.x, ds.val.x)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(validation=-0.1), "validation must be a fraction in [0, 1)"),
    (dict(validation=1.0), "validation must be a fraction in [0, 1)"),
    (dict(validation=float("nan")), "validation must be a fraction in [0, 1)"),
    (dict(subset=10, validation=0.01), "leaves no validation examples"),
    (dict(subset=2, validation=0.9), "leaves no training examples"),
])
def test_validation_errors(kwargs, needle):
    with pytest.raises(DataError) as info:
        load_dataset("synthetic", **kwargs)
    assert needle in str(info.value)


def test_mean_is_the_per_pixel_mean_of_the_training_split():
    ds = load_dataset("synthetic", subset=500, validation=0.2)
    assert ds.mean.shape == (3, 32, 32) and ds.mean.dtype == torch.float32
    assert torch.allclose(ds.mean, ds.train.x.double().mean(0).float())
    assert not torch.allclose(ds.mean, load_dataset("synthetic").mean)  # after subset and split, not before
    assert 100 < float(ds.mean.mean()) < 156  # 0..255 units


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DataError) as info:
        load_dataset("mnist")
    assert "'mnist'" in str(info.value) and all(name in str(info.value) for name in DATASET_SHAPES)


# --- the real thing ------------------------------------------------------------------------------------------
@pytest.mark.realdata
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)
    assert torch.bincount(ds.train.y).tolist() == [6000] * 10 and torch.bincount(ds.test.y).tolist() == [1000] * 10
    assert 60 < float(ds.mean.mean()) < 80  # Fashion-MNIST's mean pixel is about 72.9
