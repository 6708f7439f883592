import shutil
from pathlib import Path

import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = _REPO.parent / "shared" / "datasets" / "MNIST" / "raw"
# The GPU machine has no ../shared; benchmarks/gpu_check.sh carries the same .gz files in data/.
CARRIED_MNIST = _REPO / "data" / "MNIST" / "raw"
CIFAR_JPEG = "CIFAR-10-images/cifar10-jpeg.tar.gz"  # under ../shared/datasets, or data/ on the GPU machine


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No test writes into the user's cache or reads their DIFFCLI_DATA_ROOT."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFCLI_DATA_ROOT", raising=False)
    torch.manual_seed(1234)  # tests that forget a generator still give the same numbers
    yield


@pytest.fixture
def mnist_root(tmp_path) -> Path:
    """A data root holding copies of the official MNIST .gz files (torchvision extracts into its root)."""
    source = next((d for d in (SHARED_MNIST, CARRIED_MNIST) if any(d.glob("*.gz"))), None)
    if source is None:
        pytest.fail(f"the MNIST .gz files are expected in {SHARED_MNIST} (../shared beside the checkout) or {CARRIED_MNIST}")
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in source.glob("*.gz"):
        shutil.copy(f, raw / f.name)
    return tmp_path / "data"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder from a few steps of the tiny preset on 200 shapes images (~10 s on a CPU)."""
    from diffcli.config import build_config
    from diffcli.data import load
    from diffcli.runs import prepare_out
    from diffcli.training import train

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = build_config("tiny", None, {"data": {"name": "shapes", "limit": 200}, "train": {"max_steps": 12, "sample_every": 100}})
    data = load("shapes", limit=200)
    cfg.model.image_size, cfg.model.in_channels, cfg.model.num_classes = 32, 3, data.num_classes
    cfg.data.flip = False
    prepare_out(out, resume=False, overwrite=False)
    train(cfg, data, out)
    return out


@pytest.fixture(scope="session")
def shapes_classifier(tmp_path_factory) -> Path:
    """A tiny reference classifier for the shapes set, through the command (~2 s on a CPU)."""
    from typer.testing import CliRunner

    from diffcli.cli import app

    out = tmp_path_factory.mktemp("clf") / "shapes.safetensors"
    r = CliRunner().invoke(app, ["classifier", "train", "--data", "shapes", "--limit", "1000", "--epochs", "2", "--width", "4",
                                 "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """A .tar.gz of the first 12 training and 4 test JPEGs of each class, cut from the
    project's CIFAR-10 archive with its layout kept (one top folder, train/ and test/)."""
    import tarfile

    source = next((p for p in (_REPO.parent / "shared" / "datasets" / CIFAR_JPEG, _REPO / "data" / CIFAR_JPEG) if p.is_file()), None)
    if source is None:
        pytest.fail(f"the CIFAR-10 archive is expected at ../shared/datasets/{CIFAR_JPEG} or data/{CIFAR_JPEG}")
    out = tmp_path_factory.mktemp("cifar") / "cifar-slice.tar.gz"
    kept: dict = {}
    with tarfile.open(source, "r:gz") as src, tarfile.open(out, "w:gz") as dst:
        for m in src:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4:  # CIFAR-10-images/<split>/<class>/NNNN.jpg
                key = (parts[1], parts[2])
                if kept.get(key, 0) < (12 if parts[1] == "train" else 4):
                    kept[key] = kept.get(key, 0) + 1
                    dst.addfile(m, src.extractfile(m))
    return out
