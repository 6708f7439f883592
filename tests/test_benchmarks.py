"""The benchmark scripts still run (tiny settings; the numbers are not checked here)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_train_throughput_runs():
    r = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), "--presets", "small", "--batch", "4",
                        "--rounds", "1", "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ratio diffcli / diffusers" in r.stdout and "718,211" in r.stdout


def test_sample_throughput_runs():
    r = subprocess.run([sys.executable, str(BENCH / "sample_throughput.py"), "--n", "2", "--steps", "2", "--rounds", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ratio diffcli / diffusers" in r.stdout and "whole process: diffcli sample" in r.stdout


def test_quality_benchmark_runs(mnist_root, tmp_path):
    from diffcli.classifier import Classifier, ClassifierConfig, save_classifier

    clf = tmp_path / "clf.safetensors"  # untrained: the scores are not checked here, only that every contender runs
    save_classifier(clf, Classifier(ClassifierConfig(1, 28, 10, width=4)), [str(i) for i in range(10)], "mnist",
                    {"test_accuracy": 0.1, "per_class_accuracy": [0.1] * 10, "test_images": 10})
    r = subprocess.run([sys.executable, str(BENCH / "quality_mnist.py"), "--minutes", "0.02", "--n", "2", "--sample-steps", "2",
                        "--limit", "300", "--data-root", str(mnist_root), "--classifier", str(clf), "--json", str(tmp_path / "q.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("diffcli", "lucidrains", "diffusers", "real training images"):
        assert f"| {name} |" in r.stdout
