import re

import pytest
import yaml

from diffcli.config import RunConfig, build_config, from_dict, preset_config, to_dict
from diffcli.errors import UserError


def test_precedence_defaults_preset_file_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": 0.005, "batch_size": 7}, "diffusion": {"schedule": "linear"}}))
    cfg = build_config("tiny", str(f), {"train": {"batch_size": 3, "lr": None}})
    assert cfg.train.preset == "tiny"
    assert cfg.model.base_channels == 8  # preset
    assert cfg.train.lr == 0.005  # file over preset
    assert cfg.train.batch_size == 3  # command line over file
    assert cfg.diffusion.schedule == "linear"
    # A run's config.yaml (preset tiny) with --preset small: the command line's preset wins over the
    # file's, network included (it only relabelled tiny's network "small"); the file's own choices stay
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(to_dict(build_config("tiny", str(f), {}))))
    cfg = build_config("small", str(run), {})
    assert cfg.train.preset == "small" and cfg.model == preset_config("small").model and cfg.diffusion.schedule == "linear"
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grid_steps) == (preset_config("small").train.lr, 64, 25)  # not tiny's
    for bad in ("bogus", ""):  # ("" was read as auto: a preset left out of a script)
        with pytest.raises(UserError, match=f"unknown preset '{bad}'"):
            build_config(bad, str(run), {})
    assert build_config(None, str(run), {}).model == preset_config("tiny").model


def test_round_trip_through_yaml(tmp_path):
    cfg = preset_config("base")
    again = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize("content,key", [
    ({"train": {"learning_rate": 1}}, "train.learning_rate"),
    ({"trian": {"lr": 1}}, "trian"),
    ({"train": {"batch_size": "big"}}, "train.batch_size"),
    ({"train": {"batch_size": 1.5}}, "train.batch_size"),
    ({"model": {"channel_mult": 2}}, "model.channel_mult"),
    ({"data": {"flip": "yes"}}, "data.flip"),
    ({"train": {"lr": -1}}, "train.lr"),
    ({"diffusion": {"schedule": "sigmoid"}}, "diffusion.schedule"),
    ({"diffusion": {"timesteps": 1}}, "diffusion.timesteps"),
    ({"model": {"attn_levels": [5]}}, "model.attn_levels"),
    ({"train": {"lr": float("nan")}}, "train.lr must be a finite number"),  # YAML's .nan passes `lr > 0`-style checks
    ({"train": {"minutes": float("inf")}}, "train.minutes must be a finite number"),
    ({"train": {"ema_decay": 1.0}}, "train.ema_decay must be in [0, 1)"),
    ({"data": {"image_size": 2}}, "data.image_size must be between 4 and 1024"),
])
def test_bad_config_names_the_key(tmp_path, content, key):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(content))
    with pytest.raises(UserError, match=re.escape(key)):
        build_config(None, str(f), {})


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="preset"):
        build_config("huge", None, {})
    f = tmp_path / "c.yaml"
    f.write_text("train: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        build_config(None, str(f), {})
    with pytest.raises(UserError, match="does not exist"):
        build_config(None, str(tmp_path / "missing.yaml"), {})


def test_defaults_are_valid():
    build_config(None, None, {})
    assert RunConfig().train.preset == "small"


def test_the_auto_preset_follows_the_device():
    import torch

    from diffcli.devices import preset_for

    assert (preset_for("cpu"), preset_for("mps"), preset_for(torch.device("cuda", 1))) == ("small", "small", "base")
    asked = []
    gpu = build_config(None, None, {"train": {"device": "cuda:1"}}, lambda name: asked.append(name) or preset_for(name))
    assert asked == ["cuda:1"]  # the run's own device decides
    assert gpu.train.preset == "base" and gpu.model.base_channels == 128 and gpu.train.batch_size == 128
    assert build_config("auto", None, {}).train.preset == "small"  # the CPU
    assert build_config("small", None, {}, lambda name: "base").train.preset == "small"  # asked for
    assert from_dict(to_dict(gpu)).train.preset == "base"  # config.yaml records what auto chose
