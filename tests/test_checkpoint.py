import pickle

import pytest
import torch

from diffcli.checkpoint import load_model, model_metadata, read_header, save_model
from diffcli.config import preset_config, to_dict
from diffcli.errors import UserError
from diffcli.generate import generate
from diffcli.objective import Objective
from diffcli.schedules import make_schedule
from diffcli.spec import SamplerSpec
from diffcli.unet import UNet


def small_model(tmp_path):
    cfg = preset_config("tiny")
    cfg.model.image_size, cfg.model.in_channels, cfg.model.num_classes = 16, 1, 3
    torch.manual_seed(0)
    model = UNet(cfg.model)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / "model.safetensors"
    save_model(path, model.state_dict(), to_dict(cfg), ["a", "b", "c"], step=7, epoch=0.5)
    return model, cfg, path


def test_round_trip_gives_bit_identical_samples(tmp_path):
    model, cfg, path = small_model(tmp_path)
    loaded, cfg2, meta = load_model(path)
    assert cfg2 == cfg and meta["class_names"] == ["a", "b", "c"] and meta["step"] == 7
    objective = Objective.ddpm(make_schedule("cosine", 1000), "eps")
    spec = SamplerSpec("ddim", 5, 2.0)
    args = dict(labels=[0, 1, 2, 3], seeds=[5, 6, 7, 8])
    a = generate(model.eval(), objective, spec, **args)
    b = generate(loaded, objective, spec, **args)
    assert torch.equal(a, b)
    assert a.shape == (4, 1, 16, 16) and a.dtype == torch.uint8
    # and batching does not change image 2
    c = generate(loaded, objective, spec, **{**args, "labels": [2], "seeds": [7]})
    assert torch.equal(a[2], c[0])


def test_the_label_reading_travels_in_the_metadata_and_an_older_file_without_a_gain_keeps_its_weight(tmp_path):
    from diffcli.checkpoint import training
    from diffcli.spec import LabelReading, Trained, default_guidance

    model, cfg, _ = small_model(tmp_path)
    cfg.train.batch_size = 64  # 8,583 steps: the tops' 10-minute model, 549,312 images
    weights = []
    for labels, want in ((LabelReading(0.5312, 0.038), (0.5312, 0.038)), (LabelReading(0.5312), (0.5312, None)), (None, (None, None))):
        path = tmp_path / "m.safetensors"
        save_model(path, model.state_dict(), to_dict(cfg), ["a", "b", "c"], step=8583, epoch=1.0, labels=labels)
        meta = model_metadata(read_header(path))
        assert (meta["label_knowledge"], meta["label_gain"]) == want
        assert training(cfg, meta) == Trained(549_312, *want)
        weights.append(default_guidance(training(cfg, meta)))
    # with its gain the digits' rule; a file written before the gain, knowledge alone: the photos'; neither: the digits'
    assert weights == [1.25, 2.7, 1.25]


def test_header_is_read_without_the_weights(tmp_path):
    _, cfg, path = small_model(tmp_path)
    header = read_header(path)
    meta = model_metadata(header)
    assert meta["config"] == to_dict(cfg)
    assert "conv_in.weight" in header


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    _, _, path = small_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask_as_open_would(tmp_path, mask):
    """A model file (and every other atomic write) gets 0666 less the umask, as an ordinary
    open() would: 0644 under the usual 022, so a teammate can read an exported model."""
    import os

    old = os.umask(mask)
    try:
        _, _, path = small_model(tmp_path)
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), "not a readable safetensors"),
    (lambda p: p.write_bytes(b"hello world, not weights"), "not a readable safetensors"),
    (lambda p: p.write_bytes(pickle.dumps({"a": 1})), "pickle"),
    (lambda p: torch.save({"w": torch.zeros(2)}, p), "pickle"),
])
def test_bad_files_are_refused(tmp_path, make, message):
    path = tmp_path / "x.safetensors"
    make(path)
    with pytest.raises(UserError, match=message):
        load_model(path)


def test_a_header_length_that_starts_like_a_pickle_is_still_read(tmp_path):
    """A safetensors file begins with its header's length: when the low byte of that is 0x80,
    the first byte looks like a pickle's protocol marker. The header's '{' tells them apart."""
    import struct

    from safetensors.torch import save_file

    from diffcli.checkpoint import read_header

    path = tmp_path / "x.safetensors"
    for pad in range(64):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80 and struct.unpack("<Q", path.read_bytes()[:8])[0] % 256 == 0x80
    assert read_header(path)["__metadata__"]["pad"]


def test_truncated_file_is_refused(tmp_path):
    _, _, path = small_model(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError):
        load_model(path)
    with pytest.raises(UserError, match="it is cut short"):  # what inspect reads, the header alone, says so too
        read_header(path)


def test_foreign_safetensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(UserError, match="not written by diffcli"):
        load_model(path)


def test_wrong_shapes_are_refused(tmp_path):
    from safetensors.torch import save_file

    model, cfg, path = small_model(tmp_path)
    sd = dict(model.state_dict())
    sd["conv_in.weight"] = torch.zeros(1, 1, 1, 1)
    meta = read_header(path)["__metadata__"]
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(UserError, match="wrong shape"):
        load_model(path)


def test_a_config_no_run_could_write_is_damage(tmp_path):
    """A model file whose stored config holds T = -3 is refused when loaded, not by a
    ValueError from the schedule when it samples."""
    import json

    from safetensors.torch import save_file

    model, cfg, path = small_model(tmp_path)
    meta = read_header(path)["__metadata__"]
    stored = json.loads(meta["config"])
    stored["diffusion"]["timesteps"] = -3
    save_file(dict(model.state_dict()), str(path), metadata={**meta, "config": json.dumps(stored)})
    with pytest.raises(UserError, match="holds a config this diffcli cannot use .damaged, or from another version.: diffusion.timesteps must be"):
        load_model(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="folder"):
        load_model(tmp_path)
