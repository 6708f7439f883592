"""The `diffcli` command keeps freed activation memory mapped (allocator.py). Checked by
counting page faults over U-Net forward passes, not by timing: by default glibc hands
large freed activations back to the OS and every pass faults them in again; with the
setting a warmed-up pass reuses them (measured here: ~50,000 faults against ~2,000)."""

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
from diffcli.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
import torch
from diffcli.config import preset_config
from diffcli.unet import UNet
model = UNet(preset_config("small").model).eval()
x, t, y = torch.randn(32, 3, 32, 32), torch.arange(32), torch.arange(32) % 10
with torch.no_grad():
    model(x, t, y)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        model(x, t, y)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting exists for glibc only")


def probe(mode: str, **env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout.split()
    return out[0], int(out[1])


def test_keeping_freed_memory_stops_the_page_faults():
    applied, faults_on = probe("on")
    _, faults_off = probe("off")
    assert applied == "True"
    assert faults_on < faults_off / 5, (faults_on, faults_off)


def test_a_malloc_setting_of_the_users_own_is_left_alone():
    applied, _ = probe("on", MALLOC_ARENA_MAX="2")
    assert applied == "False"
