"""Errors a user can cause: exit code 1 and one readable sentence, never a traceback."""

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from diffcli.cli import app

runner = CliRunner()


def fails_cleanly(args, fragment):
    r = runner.invoke(app, [str(a) for a in args])
    text = " ".join(r.output.split())
    assert r.exit_code == 1, (r.exit_code, r.output)
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert text.count("error:") == 1, text  # warnings (e.g. a skipped file) may come first
    assert fragment in text, text
    return text


def ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


# --- noise-preview inputs ---------------------------------------------------------


def test_noise_preview_on_awkward_images(tmp_path):
    sixteen = tmp_path / "16bit.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(sixteen)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(cmyk)
    gif = tmp_path / "anim.gif"
    frames = [Image.new("P", (30, 30), i * 40) for i in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    floats = tmp_path / "float.tiff"  # 32-bit float in 0..1, as scientific TIFFs are
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) / 4095).astype(np.float32), mode="F").save(floats)
    for path in (sixteen, cmyk, gif, floats):
        ok(["noise-preview", path, "--frames", "2", "--image-size", "16", "--out", tmp_path / f"{path.stem}_out.png"])
    # the 16-bit ramp was scaled, not clipped to white, and the float ramp in 0..1 stretched,
    # not truncated to black: inside the clean frame (the white margin left out) both run dark to light
    for name in ("16bit", "float"):
        clean = np.asarray(Image.open(tmp_path / f"{name}_out.png").convert("L"))[4:96, 4:60]
        assert clean.min() < 60 and clean.max() > 200, name


@pytest.mark.parametrize("content,fragment", [
    (b"", "not an image"),
    (b"just some text, renamed", "not an image"),
])
def test_noise_preview_on_files_that_are_not_images(tmp_path, content, fragment):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    fails_cleanly(["noise-preview", path], fragment)


def test_noise_preview_refuses_a_huge_image(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (10000, 10000)).save(path)  # 1-bit: 12 MB in memory, tiny on disk
    fails_cleanly(["noise-preview", path], "too many pixels (10000x10000")


def test_noise_preview_on_a_folder(tmp_path):
    fails_cleanly(["noise-preview", tmp_path], "is a folder")


# --- image folders ------------------------------------------------------------------


def test_folder_with_mixed_sizes_and_modes_trains(tmp_path):
    data = tmp_path / "data"
    for cls, mode, size in (("a", "RGB", (40, 30)), ("a", "L", (16, 16)), ("b", "RGBA", (20, 50)), ("b", "P", (32, 32))):
        (data / cls).mkdir(parents=True, exist_ok=True)
        Image.new(mode, size).save(data / cls / f"{mode}_{size[0]}.png")
    r = ok(["train", "--data", data, "--preset", "tiny", "--max-steps", "1", "--out", tmp_path / "run"])
    assert "32x32, 3 channels" in " ".join(r.output.split())  # mixed sizes: 32 px; any colour image: RGB


def test_an_odd_size_trains_without_patches_and_is_refused_with_them(tmp_path):
    """The default U-Net enters by 2x2 patches, which an odd size cannot tile; without them
    any size halves (15 -> 8 -> 4 for tiny's two levels)."""
    data = tmp_path / "data"
    for cls in "ab":
        (data / cls).mkdir(parents=True)
        Image.new("RGB", (15, 15), "red" if cls == "a" else "blue").save(data / cls / "x.png")
    fails_cleanly(["train", "--data", data, "--preset", "small", "--max-steps", "1", "--out", tmp_path / "run"], "patch size 2; pass --image-size")
    ok(["train", "--data", data, "--preset", "tiny", "--max-steps", "1", "--out", tmp_path / "run2"])


def test_empty_folder_and_folder_of_broken_images(tmp_path):
    (tmp_path / "empty").mkdir()
    fails_cleanly(["train", "--data", tmp_path / "empty", "--out", tmp_path / "run"], "no images")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"nope")
    fails_cleanly(["train", "--data", tmp_path / "broken", "--out", tmp_path / "run"], "could be read")
    # one class whose every file is broken: it trains, and says that class will not be learnt
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (9 * i, 0, 0)).save(tmp_path / "pets" / "cat" / f"{i}.png")
    (tmp_path / "pets" / "dog" / "0.png").write_bytes(b"nope")
    r = ok(["train", "--data", tmp_path / "pets", "--preset", "tiny", "--max-steps", "1", "--out", tmp_path / "pets-run"])
    assert "no training image of the class(es) dog (unreadable files, or --limit)" in " ".join(r.output.split())


# --- configs and options ----------------------------------------------------------


@pytest.mark.parametrize("content,fragment", [
    ({"train": {"bach_size": 3}}, "train.bach_size"),
    ({"train": {"batch_size": "three"}}, "train.batch_size"),
    ({"train": {"ema_decay": 1.5}}, "train.ema_decay"),
    ({"data": {"image_size": 2}}, "data.image_size"),
    ({"data": {"image_size": 100000}}, "data.image_size must be between 4 and 1024"),  # (was killed for memory)
    ({"model": {"head_channels": 20}}, "model.head_channels must split the widths where attention runs (64)"),  # (3 heads: a reshape traceback)
    ({"train": {"seed": 10**19}}, "train.seed must be between 0 and 9e+18"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"diffusion": {"timesteps": 10**11}}, "diffusion.timesteps must be between 2 and 100000"),  # (a traceback for memory)
    (["a", "list"], "must hold a mapping"),
])
def test_bad_yaml_configs(tmp_path, content, fragment):  # (each refused before any data loads)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    fails_cleanly(["train", "--config", path, "--out", tmp_path / "run"], fragment)


@pytest.mark.parametrize("args,fragment", [
    (["--steps", "-3"], "--steps must be between 1 and T=1000"),
    (["--label", "-1"], "out of range"),
    (["--label", "Circle,dragon"], "unknown class 'dragon'"),
    (["--seed", "99999999999999999999"], "--seed must be between 0 and 9e+18"),  # (was torch's overflow traceback)
    (["--eta", "-0.5"], "--eta must be 0 or more"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--variance", "big"], "--variance must be"),
    (["--sampler", "heun", "--eta", "1"], "--eta is DDIM's noise, which heun does not take"),  # (ignored without a word)
    (["--sampler", "euler", "--eta", "1"], "--eta is DDIM's noise, which euler does not take"),
    (["--variance", "beta"], "--variance sets DDPM's step noise, which ddim does not take"),  # (ignored)
    (["--n", "104858"], "--n asks for 1,048,580 images of 32 px, more than one command holds in memory (1,048,576"),  # (killed for memory)
])
def test_bad_sample_options(tiny_run, tmp_path, args, fragment):
    fails_cleanly(["sample", "--ckpt", tiny_run / "model.safetensors", *args, "--out", tmp_path / "s.png"], fragment)


def test_more_images_or_timesteps_than_memory_holds_are_refused(tiny_run, tmp_path):
    fails_cleanly(["eval", "--ckpt", tiny_run / "model.safetensors", "--n", "104858"], "images of 32 px, more than one command holds in memory (1,048,576 at this size); lower --n.")
    fails_cleanly(["noise-preview", "--plot", tmp_path / "p.png", "--timesteps", "100001"], "--timesteps must be between 2 and 100000")


def test_a_large_training_seed_trains(tmp_path):  # (each epoch's order seeds from seed x 1,000,003: it overflowed)
    ok(["train", "--data", "shapes", "--limit", "16", "--image-size", "16", "--preset", "tiny", "--max-steps", "1",
        "--seed", "20000000000000", "--out", tmp_path / "run"])


def test_yaml_numbers_without_a_dot_are_numbers():
    """PyYAML reads `1e-4` (YAML 1.1: no dot) as a string, where the command line's --lr 1e-4 is a number."""
    from diffcli.config import RunConfig, apply_overrides

    cfg = apply_overrides(RunConfig(), yaml.safe_load("train:\n  lr: 1e-4\n  batch_size: 1e2\n"))
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 100 and isinstance(cfg.train.batch_size, int)


def test_class_names_are_case_insensitive(tiny_run, tmp_path):
    ok(["sample", "--ckpt", tiny_run / "model.safetensors", "--label", "CIRCLE,star", "--n", "1", "--steps", "2",
        "--out", tmp_path / "s.png"])


def test_compare_draws_one_class(tiny_run, tmp_path):  # (it drew the first of them without a word)
    fails_cleanly(["compare", "--ckpt", tiny_run / "model.safetensors", "--label", "0,1", "--out", tmp_path / "c.png"],
                  "--label names 2 classes, and compare draws one")


def test_class_names_that_differ_only_in_case():
    from diffcli.cli._common import parse_labels
    from diffcli.errors import UserError

    names = ["Cat", "cat", "dog"]
    assert parse_labels("Cat,cat,DOG,2", names) == [0, 1, 2, 2]  # spelled as a class: that class
    with pytest.raises(UserError, match="'CAT' could be any of the classes Cat, cat"):
        parse_labels("CAT", names)
    commas = ["x,y", "x", "Y"]  # a folder may be named with a comma: the whole text names it first
    assert parse_labels("x,y", commas) == [0] and parse_labels(" X,Y ", commas) == [0]
    assert parse_labels("x,Y", ["x", "Y"]) == [0, 1] and parse_labels("Y,x", commas) == [2, 1]


def test_out_folder_holding_another_run(tiny_run, tmp_path):
    fails_cleanly(["train", "--data", "shapes", "--limit", "32", "--preset", "tiny", "--out", tiny_run], "already holds a run")
    fails_cleanly(["train", "--data", "shapes", "--out", tiny_run / "model.safetensors"], "is a file")
