"""The diffusers format, out and in, checked against diffusers' own UNet2DModel (dev extra, no network)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from diffcli import hub
from diffcli.checkpoint import load_model, save_model
from diffcli.cli import app
from diffcli.config import preset_config, to_dict
from diffcli.unet import UNet

runner = CliRunner()
DDPM_CIFAR10 = {  # google/ddpm-cifar10-32's published unet/config.json
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"], "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_sentence_error(result, fragment):
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in text and fragment in text, (result.exit_code, result.output)


def random_model(tmp_path, classes=10, scale_shift=None, shallow=False, preset="base", norm_groups=None, size=16,
                 objective="ddpm"):
    """A diffcli model file of `preset` (two levels of one block each where `shallow`, for
    speed: still 32 groups throughout), random weights; without patches, which diffusers lacks."""
    cfg = preset_config(preset)
    cfg.model.norm_groups, cfg.model.patch_size = norm_groups, 1
    cfg.model.num_classes, cfg.model.image_size, cfg.model.in_channels = classes, size, 3
    cfg.diffusion.objective = objective
    if scale_shift is not None:
        cfg.model.scale_shift = scale_shift
    if shallow:
        cfg.model.channel_mult, cfg.model.num_res_blocks, cfg.model.attn_levels = (1, 2), 1, (1,)
    torch.manual_seed(0)
    net = UNet(cfg.model)
    for p in net.parameters():  # zero-initialised branches would hide a mapping error there
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / f"m{classes}{scale_shift}.safetensors"
    save_model(path, net.state_dict(), to_dict(cfg), [f"c{i}" for i in range(classes)], 1, 0.0)
    return path


def inputs(classes, n=3, size=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, classes + 1, (n,), generator=g) if classes else torch.zeros(n, dtype=torch.long)
    return x, t, y


@pytest.mark.parametrize("classes,scale_shift,shallow,preset,groups", [
    (10, None, False, "base", None), (0, None, True, "base", None), (10, True, True, "base", None),  # base; unconditional; AdaGN
    (10, None, False, "small", 4)])  # small's widths with one group count everywhere
def test_an_exported_model_gives_diffcli_s_output_in_diffusers(tmp_path, classes, scale_shift, shallow, preset, groups):
    from diffusers import DDIMScheduler, UNet2DModel

    from safetensors.torch import load_file

    from diffcli.checkpoint import model_metadata, read_header, save_model
    from diffcli.spec import LabelReading, default_guidance

    ckpt = random_model(tmp_path, classes, scale_shift, shallow, preset, groups)
    meta = model_metadata(read_header(ckpt))  # trained as a photo model is: the rule gives it neither 2 nor its ceiling
    tuned = {"weight": 1.15, "rule": 1.55} if groups else None  # a weight `tune-guidance` chose: it holds for the same weights
    save_model(ckpt, load_file(str(ckpt)), meta["config"], meta["class_names"], 9000, 0.0, LabelReading(0.3, 0.012), tuned)
    r = run("export", "--ckpt", ckpt, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    theirs = UNet2DModel.from_pretrained(str(tmp_path / "out"), subfolder="unet").eval()
    ours, cfg, _ = load_model(ckpt)
    x, t, y = inputs(classes)
    with torch.no_grad():
        want = ours(x, t, y)
        got = theirs(x, t, class_labels=y if classes else None).sample
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    sched = DDIMScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
    from diffcli.schedules import make_schedule

    assert torch.allclose(sched.alphas_cumprod.float(), make_schedule(cfg.diffusion.schedule, 1000).alphas_cumprod, atol=1e-6)
    assert sched.config.prediction_type == "v_prediction" and sched.config.timestep_spacing == "trailing"
    assert json.loads((tmp_path / "out" / "class_names.json").read_text())["null_label"] == (classes or None)
    assert "UNet2DModel.from_pretrained" in (tmp_path / "out" / "README.md").read_text()
    # and back: the folder imports into the same network
    assert run("import", tmp_path / "out", "--out", tmp_path / "back.safetensors").exit_code == 0
    back, back_cfg, back_meta = load_model(tmp_path / "back.safetensors")
    with torch.no_grad():
        assert (back(x, t, y) - want).abs().max() < 1e-5
    assert back_meta["class_names"] == [f"c{i}" for i in range(classes)] and back_cfg.diffusion == cfg.diffusion
    # with the training the guidance rule reads, so both sample with one weight (the import drew at 2), as the card says
    w = default_guidance(ours.trained)
    assert default_guidance(back.trained) == w not in (2.0, 3.0) and back_meta["step"] == 9000
    assert back_meta["tuned_guidance"] == tuned and (w == 1.15) == bool(groups)
    assert (f"uncond + {w:g} * (cond - uncond)" in (tmp_path / "out" / "README.md").read_text()) == bool(classes)


@pytest.mark.parametrize("broken", [False, True])
def test_a_flow_model_exports_to_flow_match_euler_whose_own_steps_draw_diffcli_s_images(tmp_path, broken):
    """Export, then diffusers' UNet2DModel stepped by its FlowMatchEulerDiscreteScheduler on diffcli's
    grid of flow times, guided as diffcli guides: the same images as `diffcli sample --sampler euler`
    (broken: the network fed the flow time s instead of s·T)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    from diffcli.generate import generate
    from diffcli.objective import of
    from diffcli.samplers import PerImageNoise
    from diffcli.spec import SamplerSpec

    ckpt = random_model(tmp_path, 10, None, True, "base", None, size=8, objective="flow")
    assert run("export", "--ckpt", ckpt, "--out", tmp_path / "out").exit_code == 0
    unet = UNet2DModel.from_pretrained(str(tmp_path / "out"), subfolder="unet").eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path / "out"), subfolder="scheduler")
    model, cfg, _ = load_model(ckpt)
    steps, w, seeds, y = 6, 2.0, [3, 4], torch.tensor([1, 7])
    ours = generate(model, of(cfg.diffusion), SamplerSpec("euler", steps, w, clip=False), labels=y.tolist(), seeds=seeds)
    sched.set_timesteps(sigmas=[1 - i / steps for i in range(steps)])
    x = PerImageNoise(seeds)(torch.empty(2, 3, 8, 8))
    with torch.no_grad():
        for t in sched.timesteps:
            both = unet(torch.cat([x, x]), t / 1000 if broken else t, class_labels=torch.cat([y, torch.full_like(y, 10)])).sample
            cond, uncond = both.chunk(2)
            x = sched.step(uncond + w * (cond - uncond), t, x).prev_sample
    theirs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    gap = (theirs.int() - ours.int()).abs().max().item()
    assert (gap > 1) if broken else (gap <= 1), gap  # uint8 rounding of a float difference near 1e-5
    assert run("import", tmp_path / "out", "--out", tmp_path / "back.safetensors").exit_code == 0
    back, back_cfg, _ = load_model(tmp_path / "back.safetensors")
    assert back_cfg.diffusion.objective == "flow" and back_cfg.diffusion.timesteps == cfg.diffusion.timesteps
    x, t, y = inputs(10, size=8)
    with torch.no_grad():
        assert (back(x, t.float() / 3, y) - model(x, t.float() / 3, y)).abs().max() < 1e-5


def test_a_wrong_schedule_mapping_breaks_the_comparison(monkeypatch):
    from diffusers import DDIMScheduler

    from diffcli.schedules import make_schedule

    monkeypatch.setitem(hub.BETA_SCHEDULES, "cosine", "linear")
    sched = DDIMScheduler.from_config(hub.scheduler_config(preset_config("base")))
    assert not torch.allclose(sched.alphas_cumprod.float(), make_schedule("cosine", 1000).alphas_cumprod, atol=1e-6)


def test_the_published_ddpm_cifar10_layout_imports_and_gives_its_output(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    theirs = UNet2DModel(**{k: v for k, v in DDPM_CIFAR10.items() if not k.startswith("_")}).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.02)
    folder = tmp_path / "ddpm-cifar10-32"
    theirs.save_pretrained(str(folder / "unet"))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
                                                         "unet": ["diffusers", "UNet2DModel"]}))
    r = run("import", folder, "--out", tmp_path / "ddpm.safetensors")
    assert r.exit_code == 0, r.output
    ours, cfg, meta = load_model(tmp_path / "ddpm.safetensors")
    assert cfg.model.num_classes == 0 and cfg.diffusion.prediction == "eps" and cfg.diffusion.schedule == "linear"
    x, t, y = inputs(0, n=2, size=32)
    with torch.no_grad():
        assert (ours(x, t, y) - theirs(x, t).sample).abs().max() < 1e-4
    from diffcli.schedules import make_schedule

    sched = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    assert torch.allclose(sched.alphas_cumprod.float(), make_schedule("linear", 1000).alphas_cumprod, atol=1e-6)
    r = run("sample", "--ckpt", tmp_path / "ddpm.safetensors", "--label", "all", "--n", "1", "--steps", "1",
            "--out", tmp_path / "s.png", "--device", "cpu")
    assert r.exit_code == 0, r.output
    # It records no training images: eval asks for --data (it looked for images in the pipeline folder)
    one_sentence_error(run("eval", "--ckpt", tmp_path / "ddpm.safetensors", "--n", "2", "--steps", "1"),
                       f"this model was imported from the diffusers folder '{folder}', which records no training images; pass --data")


def test_the_attention_names_of_early_diffusers_files_are_read_too():
    """google/ddpm-* on the Hub predate to_q/to_k/to_v/to_out.0: query, key, value, proj_attn."""
    from diffusers import UNet2DModel

    cfg = hub.model_config(DDPM_CIFAR10, 0)
    new = UNet2DModel(**{k: v for k, v in DDPM_CIFAR10.items() if not k.startswith("_")}).state_dict()
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in new.items()}
    assert old.keys() != new.keys()
    a, b = hub.from_diffusers(new, cfg), hub.from_diffusers(old, cfg)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_wrong_weight_mapping_breaks_the_comparison(tmp_path, monkeypatch):
    """The checks above can fail: the fused qkv convolution split in the wrong order (k and v swapped)."""
    real = hub.to_diffusers

    def swapped(ours, m):
        theirs = real(ours, m)
        for key in [k for k in theirs if ".to_k." in k]:
            other = key.replace(".to_k.", ".to_v.")
            theirs[key], theirs[other] = theirs[other], theirs[key]
        return theirs

    monkeypatch.setattr("diffcli.hub_files.to_diffusers", swapped)
    from diffusers import UNet2DModel

    ckpt = random_model(tmp_path, 10, None, shallow=True)
    assert run("export", "--ckpt", ckpt, "--out", tmp_path / "out").exit_code == 0
    theirs = UNet2DModel.from_pretrained(str(tmp_path / "out"), subfolder="unet").eval()
    ours, _, _ = load_model(ckpt)
    x, t, y = inputs(10)
    with torch.no_grad():
        assert (theirs(x, t, class_labels=y).sample - ours(x, t, y)).abs().max() > 1e-3


def test_what_diffusers_or_diffcli_cannot_express_is_refused(tiny_run, tmp_path):
    one_sentence_error(run("export", "--ckpt", tiny_run / "model.safetensors", "--out", tmp_path / "a"),
                       "UNet2DModel has one GroupNorm group count for every layer")
    # diffcli runs sizes that do not halve evenly (10 -> 5 -> 3); UNet2DModel's concatenation fails on them
    odd = random_model(tmp_path, shallow=False, preset="small", norm_groups=4, size=10)
    one_sentence_error(run("export", "--ckpt", odd, "--out", tmp_path / "b"), "this model's 10 does not")
    folder = tmp_path / "fourier"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text(json.dumps({**DDPM_CIFAR10, "time_embedding_type": "fourier"}))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "linear"}))
    one_sentence_error(run("import", folder, "--out", tmp_path / "x.safetensors"), "its time_embedding_type is 'fourier'")
    (folder / "unet" / "config.json").write_text(json.dumps(DDPM_CIFAR10))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "scaled_linear"}))
    one_sentence_error(run("import", folder, "--out", tmp_path / "x.safetensors"), "this scheduler has 'scaled_linear'")
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EDMEulerScheduler", "sigma_max": 80}))
    one_sentence_error(run("import", folder, "--out", tmp_path / "x.safetensors"), "this one's is 'EDMEulerScheduler'")
    one_sentence_error(run("import", tmp_path / "nothing", "--out", tmp_path / "x.safetensors"), "is not a folder")


def test_a_damaged_import_is_one_sentence_naming_the_file_and_the_key(tmp_path):
    """Truncated weights, a string where config.json wants a number, and a folder without
    model_index.json (named as given, not as '.')."""
    folder = tmp_path / "pipe"
    assert run("export", "--ckpt", random_model(tmp_path, shallow=True), "--out", folder).exit_code == 0
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_sentence_error(run("import", folder, "--out", tmp_path / "a.safetensors"), f"'{weights}' could not be read: it looks truncated")
    weights.write_bytes(data)
    config = json.loads((folder / "unet" / "config.json").read_text())
    for key, bad in (("layers_per_block", "2"), ("block_out_channels", [128, "x"]), ("norm_eps", None)):
        (folder / "unet" / "config.json").write_text(json.dumps({**config, key: bad}))
        one_sentence_error(run("import", folder, "--out", tmp_path / "b.safetensors"),
                           f"'{folder / 'unet' / 'config.json'}' has {bad!r} for \"{key}\"")
    # weights of another width than config.json says: the message named no weight, only torch's heading
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [w * 2 for w in config["block_out_channels"]]}))
    one_sentence_error(run("import", folder, "--out", tmp_path / "b.safetensors"), "do not fit their config.json (size mismatch for")
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": "1000"}))
    one_sentence_error(run("import", folder, "--out", tmp_path / "c.safetensors"), "'1000' for \"num_train_timesteps\"")
    (folder / "model_index.json").unlink()
    one_sentence_error(run("import", folder, "--out", tmp_path / "d.safetensors"), f"is '{folder}' a diffusers pipeline folder?")
    assert not list(tmp_path.glob("[abcd].safetensors"))
