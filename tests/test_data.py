import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffcli import data as D
from diffcli.errors import UserError


def test_pixel_range_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = D.to_model_range(u8)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(D.from_model_range(x), u8)


def test_shapes_is_deterministic_balanced_and_rgb():
    a = D.make_shapes(size=32, per_class=20, seed=0)
    b = D.make_shapes(size=32, per_class=20, seed=0)
    assert torch.equal(a.images, b.images)
    assert a.images.shape == (200, 3, 32, 32) and a.images.dtype == torch.uint8
    assert a.class_names == list(D.SHAPES) and len(set(a.class_names)) == 10
    assert torch.bincount(a.labels).tolist() == [20] * 10
    c = D.make_shapes(size=32, per_class=20, seed=1)
    assert not torch.equal(a.images, c.images)


def test_shapes_differ_by_class():
    """The shape, not the colour, carries the class: mean foreground coverage differs."""
    d = D.make_shapes(size=32, per_class=50)
    # a ring covers less area than a disc of the same size; a bar-like arrow less than a square
    gray = d.images.float().mean(1)
    contrast = (gray - gray.mean((1, 2), keepdim=True)).abs().mean((1, 2))
    per_class = torch.stack([contrast[d.labels == k].mean() for k in range(10)])
    assert per_class.std() > 0.5


def test_load_with_limit_and_resize():
    d = D.load("shapes", image_size=16, limit=25)
    assert d.images.shape == (25, 3, 16, 16)


def test_a_folder_named_like_a_dataset_is_named_in_a_warning_and_read_as_a_path(tmp_path, monkeypatch, caplog):
    """`--data shapes` is the built-in set even beside a folder ./shapes; the user hears of
    the folder, and `./shapes` reads it."""
    for k, cls in enumerate(("cat", "dog")):
        (tmp_path / "shapes" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200 * k, 50, 50)).save(tmp_path / "shapes" / cls / "0.png")
    monkeypatch.chdir(tmp_path)
    built_in = D.load("shapes", limit=20)
    assert built_in.class_names == list(D.SHAPES)
    assert "not the folder 'shapes' here; give './shapes'" in caplog.text
    caplog.clear()
    folder = D.load("./shapes", root=str(tmp_path / "root"))
    assert folder.class_names == ["cat", "dog"] and "is the named dataset" not in caplog.text


def test_mnist_from_the_official_files(mnist_root):
    d = D.load("mnist", str(mnist_root), limit=1000)
    assert d.images.shape == (1000, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.class_names == [str(i) for i in range(10)]
    assert d.labels[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # the first MNIST training labels


def test_read_only_mnist_folder_is_copied_not_written(mnist_root, tmp_path):
    raw = mnist_root / "MNIST" / "raw"
    raw.chmod(0o555)
    try:
        before = sorted(p.name for p in raw.iterdir())
        d = D.load("mnist", str(mnist_root), limit=10)
        assert sorted(p.name for p in raw.iterdir()) == before, "a read-only data folder was written to"
        assert d.labels.tolist()[:3] == [5, 0, 4]
        assert list((tmp_path / "cache" / "diffcli" / "datasets" / "read-only-copies").glob("*/MNIST/raw/train-images-idx3-ubyte"))
    finally:
        raw.chmod(0o755)


def test_missing_dataset_offline_is_one_clear_sentence(tmp_path, monkeypatch):
    import torchvision.datasets.utils as U

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(U, "download_url", no_network)
    monkeypatch.setattr(U, "download_and_extract_archive", no_network)
    import torchvision.datasets.mnist as M

    monkeypatch.setattr(M, "download_and_extract_archive", no_network)
    with pytest.raises(UserError) as e:
        D.load("mnist", str(tmp_path))
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "MNIST" / "raw") in msg and "\n" not in msg


def write_fake_cifar10(root, n_per_batch=4):
    """A tiny dataset in CIFAR-10's own python on-disk format (pickled batches in cifar-10-batches-py)."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), "labels": list(range(n_per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in names + ["batches.meta"]}


def test_cifar10_code_path_on_a_tiny_fake(tmp_path, monkeypatch):
    """torchvision checks the official md5s before unpickling; the test swaps in its own files' md5s."""
    from torchvision.datasets import CIFAR10

    md5 = write_fake_cifar10(tmp_path)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})
    d = D.load("cifar10", str(tmp_path))
    assert d.images.shape == (20, 3, 32, 32) and d.class_names[3] == "cat"
    assert d.labels.tolist() == [0, 1, 2, 3] * 5


def test_cifar10_files_with_wrong_checksums_are_not_unpickled(tmp_path, monkeypatch):
    import torchvision.datasets.utils as U

    write_fake_cifar10(tmp_path)
    monkeypatch.setattr(U, "download_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(UserError, match="cifar-10-python.tar.gz"):
        D.load("cifar10", str(tmp_path))


def make_folder(root, classes=("cat", "dog"), n=3, size=(20, 20), mode="RGB"):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new(mode, size, color=(40 * i) if mode == "L" else (40 * i, 10, 200)).save(root / c / f"{i}.png")


def test_image_folder_with_classes(tmp_path):
    make_folder(tmp_path)
    d = D.load(str(tmp_path))
    assert d.class_names == ["cat", "dog"] and d.images.shape == (6, 3, 20, 20)
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_grayscale_unconditional_resized(tmp_path):
    for i in range(4):
        Image.new("L", (40, 30), color=i * 50).save(tmp_path / f"{i}.png")
    d = D.load(str(tmp_path), image_size=16)
    assert d.class_names == [] and d.images.shape == (4, 1, 16, 16)


def test_image_folder_skips_corrupt_files_with_a_warning(tmp_path, caplog):
    make_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png at all")
    d = D.load(str(tmp_path))
    assert d.images.shape[0] == 6
    assert "broken.png" in caplog.text


def test_empty_folder_and_bad_names(tmp_path):
    with pytest.raises(UserError, match="no images"):
        D.load(str(tmp_path))
    with pytest.raises(UserError, match="neither a dataset name"):
        D.load("imagenet-21k")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        D.load(str(f))
