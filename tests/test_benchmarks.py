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
