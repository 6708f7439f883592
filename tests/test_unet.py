import pytest
import torch

from diffcli.config import ModelConfig, preset_config
from diffcli.unet import UNet, count_parameters, timestep_embedding


def tiny(**kw):
    cfg = preset_config("tiny").model
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("channels,size,mult", [(1, 28, (1, 2, 2)), (3, 32, (1, 2)), (3, 24, (1, 2, 2, 2)), (1, 12, (1,))])
def test_output_shape_matches_input(channels, size, mult):
    cfg = tiny(in_channels=channels, image_size=size, channel_mult=mult, attn_levels=(len(mult) - 1,))
    model = UNet(cfg)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]), torch.tensor([3, cfg.num_classes]))  # a label and "no label"
    assert out.shape == x.shape


@pytest.mark.parametrize("size,mult,patch,channels", [(30, (1, 2, 2), 1, 3), (28, (1, 2, 2), 2, 3), (10, (1, 2, 2, 2), 1, 3),
                                                       (28, (1, 2), 2, 1)])  # the last: MNIST's shape, two patched levels
def test_sizes_that_do_not_halve_evenly_run(size, mult, patch, channels):
    """28 with patches of 2 is 14, 7, then 4 at the bottom: each upsampling goes back to its
    skip's size. Without that the concatenation fails (shown by mutating the interpolation
    back to a plain doubling)."""
    cfg = tiny(image_size=size, channel_mult=mult, patch_size=patch, attn_levels=(len(mult) - 1,), in_channels=channels)
    x = torch.randn(2, channels, size, size)
    assert UNet(cfg)(x, torch.tensor([3, 900]), torch.tensor([0, 10])).shape == x.shape


def test_patches_that_do_not_tile_the_image_are_refused():
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        UNet(tiny(image_size=30, patch_size=4))


def test_base_preset_is_the_ddpm_cifar10_network():
    cfg = preset_config("base").model
    cfg.image_size, cfg.in_channels, cfg.num_classes = 32, 3, 10
    n = count_parameters(UNet(cfg))
    # DDPM reports 35.7M for CIFAR-10; ours adds a 11x512 class embedding (5,632 weights).
    assert abs(n - 35.7e6) < 0.1e6, n


def test_conditioning_changes_the_output():
    torch.manual_seed(0)
    model = UNet(tiny())
    for p in model.parameters():  # zero-initialised output layers would hide the conditioning
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 3, 32, 32)
    a = model(x, torch.tensor([10]), torch.tensor([1]))
    assert not torch.allclose(a, model(x, torch.tensor([10]), torch.tensor([2])))
    assert not torch.allclose(a, model(x, torch.tensor([500]), torch.tensor([1])))


def test_zero_initialised_output_starts_at_zero():
    model = UNet(tiny())
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert torch.count_nonzero(out) == 0


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb[1, :4], torch.cos(5 * freqs)) and torch.allclose(emb[1, 4:], torch.sin(5 * freqs))


def test_gradients_reach_every_parameter():
    model = UNet(tiny(dropout=0.1))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([3, 700]), torch.tensor([0, 10]))
    out.square().mean().backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_default_model_config_is_the_small_preset():
    assert ModelConfig() == preset_config("small").model
    assert count_parameters(UNet(ModelConfig())) == 1_198_988  # 32x32 RGB, 10 classes (README: 1.2M)


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_matches_the_textbook_formula(scale_shift):
    """The folded scale-shift (one addcmul) equals GroupNorm-with-affine, x (1 + scale), + shift,
    with non-trivial norm weights; in-place sampling mode gives what the autograd mode gives."""
    import torch.nn.functional as F

    from diffcli.unet import ResBlock

    torch.manual_seed(0)
    block = ResBlock(8, 16, 32, dropout=0.0, scale_shift=scale_shift)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(3, 8, 6, 6), torch.randn(3, 32)

    h = block.conv1(F.silu(block.norm1(x)))
    e = block.emb(emb)[:, :, None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = block.norm2(h) * (1 + scale) + shift
    else:
        h = block.norm2(h + e)
    expected = block.skip(x) + block.conv2(F.silu(h))

    assert torch.allclose(block(x, emb), expected, atol=1e-5)
    kept = x.clone()
    with torch.no_grad():
        assert torch.allclose(block(x, emb), expected, atol=1e-5)
    assert torch.equal(x, kept)  # in-place activations must never reach the caller's tensor
