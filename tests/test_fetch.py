"""`ablate data fetch` end to end against a local HTTP server standing in for the dataset mirrors: small
files in the real formats (a slice of the Debian Fashion-MNIST, CIFAR batches pickled as the originals),
torchvision's own downloaders pointed at the server with these files' MD5 checksums."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading

import numpy as np
import pytest
from torchvision import datasets

from orchestrator.cli import main
from tests.conftest import free_port
from workers import data
from workers.data import load_dataset, read_idx

CIFAR = {  # name → (class, folder, training files, test file, label key, meta file, meta key, classes)
    "cifar10": (datasets.CIFAR10, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", "batches.meta", "label_names", 10),
    "cifar100": (datasets.CIFAR100, "cifar-100-python", ["train"], "test", "fine_labels", "meta",
                 "fine_label_names", 100),
}


def md5(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path):
    """A directory served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def fetch(*args, capsys):
    code = main(["data", "fetch", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def serve_fashion(served, base, monkeypatch):
    """The first 30 training and 10 test images of the Debian package, gzipped IDX as the mirror has them."""
    folder = served / "fashion"
    folder.mkdir()
    resources = []
    arrays = {}
    for stem, count in (("train-images-idx3-ubyte", 30), ("train-labels-idx1-ubyte", 30),
                        ("t10k-images-idx3-ubyte", 10), ("t10k-labels-idx1-ubyte", 10)):
        array = read_idx(data.DEBIAN_FASHION_MNIST / f"{stem}.gz", ndim=3 if "images" in stem else 1)[:count]
        header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
        raw = gzip.compress(header + array.tobytes())
        (folder / f"{stem}.gz").write_bytes(raw)
        resources.append((f"{stem}.gz", md5(raw)))
        arrays[stem] = array
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [f"{base}/fashion/"])
    monkeypatch.setattr(datasets.FashionMNIST, "resources", resources)
    return arrays


def serve_cifar(name, served, base, monkeypatch):
    """A tar.gz of the real layout: batches pickled with str keys at protocol 2 (as Python 2 wrote them)."""
    cls, folder, train_files, test_file, label_key, meta_file, meta_key, classes = CIFAR[name]
    rng = np.random.default_rng(0)
    files, arrays = {}, {}
    for i, file in enumerate(train_files + [test_file]):
        x = rng.integers(0, 256, (3 + i, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, classes, len(x))]
        files[file] = pickle.dumps({"batch_label": "batch", label_key: y, "data": x}, protocol=2)
        arrays[file] = (x.reshape(-1, 3, 32, 32), np.array(y))
    files[meta_file] = pickle.dumps({meta_key: [f"class{c}" for c in range(classes)]}, protocol=2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for file, raw in files.items():
            info = tarfile.TarInfo(f"{folder}/{file}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    archive = buffer.getvalue()
    (served / cls.filename).write_bytes(archive)
    monkeypatch.setattr(cls, "url", f"{base}/{cls.filename}")
    monkeypatch.setattr(cls, "tgz_md5", md5(archive))
    monkeypatch.setattr(cls, "train_list", [[f, md5(files[f])] for f in train_files])
    monkeypatch.setattr(cls, "test_list", [[test_file, md5(files[test_file])]])
    monkeypatch.setattr(cls, "meta", {"filename": meta_file, "key": meta_key, "md5": md5(files[meta_file])})
    return arrays


def test_fashion_mnist_fetched_and_read(tmp_path, mirror, monkeypatch, capsys):
    served, base = mirror
    arrays = serve_fashion(served, base, monkeypatch)
    root = tmp_path / "data"
    code, out = fetch("fashion-mnist", "--dir", str(root), capsys=capsys)
    assert code == 0 and out["downloaded"] is True and out["use"] == f"ABLATE_DATA_DIR={root}"
    assert out["folder"] == str(root / "FashionMNIST" / "raw")
    ds = load_dataset("fashion-mnist", data_dir=root)
    assert np.array_equal(ds.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    # Already there: nothing is downloaded, so it works without the mirror (here: renamed away).
    (served / "fashion").rename(served / "gone")
    code, out = fetch("fashion-mnist", "--dir", str(root), capsys=capsys)
    assert code == 0 and out["downloaded"] is False


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_fetched_and_read(tmp_path, mirror, monkeypatch, capsys, name):
    served, base = mirror
    arrays = serve_cifar(name, served, base, monkeypatch)
    cls, folder, train_files, test_file = CIFAR[name][:4]
    monkeypatch.setenv("ABLATE_DATA_DIR", str(tmp_path / "data"))  # the destination when --dir is absent
    code, out = fetch(name, capsys=capsys)
    assert code == 0 and out["downloaded"] is True and out["folder"] == str(tmp_path / "data" / folder)
    assert not (tmp_path / "data" / cls.filename).exists()  # the archive goes once its contents are checked
    ds = load_dataset(name)
    assert np.array_equal(ds.train.x.numpy(), np.concatenate([arrays[f][0] for f in train_files]))
    assert np.array_equal(ds.test.y.numpy(), arrays[test_file][1])


def test_a_file_that_fails_its_checksum_is_refused(tmp_path, mirror, monkeypatch, capsys):
    served, base = mirror
    serve_fashion(served, base, monkeypatch)
    good = (served / "fashion" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (served / "fashion" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"substituted"))
    root = tmp_path / "data"
    code, out = fetch("fashion-mnist", "--dir", str(root), capsys=capsys)
    assert code == 2 and "does not match the MD5 checksum torchvision ships" in out["error"]
    assert list(root.iterdir()) == []  # nothing half-written that the loader could take for the dataset
    (served / "fashion" / "t10k-labels-idx1-ubyte.gz").write_bytes(good)
    code, out = fetch("fashion-mnist", "--dir", str(root), capsys=capsys)
    assert code == 0 and out["downloaded"] is True


def test_unreachable_mirror_and_bad_requests_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [f"http://127.0.0.1:{free_port()}/"])
    code, out = fetch("fashion-mnist", "--dir", str(tmp_path), capsys=capsys)
    assert code == 2 and out["error"].startswith(f"cannot fetch fashion-mnist into {tmp_path}: Error downloading")
    assert "refused" in out["error"] and "\n" not in out["error"]
    code, out = fetch("imagenet", "--dir", str(tmp_path), capsys=capsys)
    assert code == 2 and "no public download: put an ImageFolder tree at <root>/imagenet/" in out["error"]
    monkeypatch.delenv("ABLATE_DATA_DIR", raising=False)
    code, out = fetch("cifar10", capsys=capsys)
    assert code == 2 and "no destination: give --dir DIR or set ABLATE_DATA_DIR" in out["error"]
