"""torch.compile: the U-Net traces as one graph, a compiled run trains like an eager one,
and a backend that fails falls back to eager with a notice instead of a traceback.

The tests compile with the "aot_eager" backend: it captures the same forward and backward
graphs as Inductor (so a graph break or an untraceable op shows up here) without
generating code, which on this CPU takes a minute.
"""

import pytest
import torch
from safetensors.torch import load_file
from torchvision.io import read_image
from typer.testing import CliRunner

from diffcli import compiling
from diffcli.cli import app
from diffcli.config import preset_config
from diffcli.unet import UNet

runner = CliRunner()
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test (and each CLI call below) starts as a new process would: nothing compiled yet,
    so cache entries from one test neither count as recompiles nor fill the cache of another."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_unet(**model):
    cfg = preset_config("tiny").model
    cfg.image_size, cfg.in_channels, cfg.num_classes = 16, 1, 3
    for k, v in model.items():
        setattr(cfg, k, v)
    return UNet(cfg)


def test_the_unet_is_one_graph_in_training_and_sampling():
    torch.manual_seed(0)
    net = tiny_unet(dropout=0.1)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 900]), torch.tensor([0, 3])
    for mode in (net.train, net.eval):
        mode()
        explained = torch._dynamo.explain(net)(x, t, y)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_wanted_is_on_for_cuda_only_unless_asked():
    assert compiling.wanted(None, torch.device("cuda")) and not compiling.wanted(None, torch.device("cpu"))
    assert compiling.wanted(True, torch.device("cpu")) and not compiling.wanted(False, torch.device("cuda"))


def test_a_compiled_training_step_matches_eager_and_the_check_leaves_the_random_sequence_alone(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch.manual_seed(0)
    net = tiny_unet().to(memory_format=torch.channels_last)
    x, t, y = torch.randn(4, 1, 16, 16), torch.tensor([1, 10, 500, 999]), torch.tensor([0, 1, 2, 3])
    notices = []

    def check(f):
        f(x, t, y).sum().backward()
        torch.rand(7)  # stands in for dropout's draws (the tiny preset has none)

    torch.manual_seed(5)
    fast = compiling.compiled(net, check, lambda event, **info: notices.append(info), CPU)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))  # the try's draws would otherwise shift every later one
    assert fast is not net and not notices
    assert all(p.grad is not None for p in net.parameters())  # the check ran backward through the compiled graph
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    eager_out = net(x, t, y)
    eager_out.sum().backward()
    torch.testing.assert_close(fast(x, t, y), eager_out, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler found")


def test_cli_trains_the_same_with_compile_and_falls_back_when_it_cannot(tmp_path, monkeypatch):
    common = ["train", "--data", "shapes", "--limit", "64", "--preset", "tiny", "--max-steps", "3", "--image-size", "16"]
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    # The check compiles for the real shapes: a step that compiles again is a failed run here.
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    fast = runner.invoke(app, [*common, "--compile", "--out", str(tmp_path / "fast")])
    assert fast.exit_code == 0, fast.output
    assert "compiling the U-Net" in fast.output and "did not work" not in fast.output
    torch._dynamo.reset()  # each command is a fresh process
    sampled = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "fast" / "model.safetensors"), "--n", "2",
                                  "--steps", "3", "--compile", "--out", str(tmp_path / "s.png")])
    assert sampled.exit_code == 0 and "did not work" not in sampled.output, sampled.output

    torch._dynamo.reset()
    monkeypatch.setattr(compiling, "BACKEND", _broken_backend)
    broken = runner.invoke(app, [*common, "--compile", "--out", str(tmp_path / "broken")])
    assert broken.exit_code == 0, broken.output
    said = " ".join(broken.output.split())  # rich wraps lines at 80 columns
    assert "torch.compile did not work here (RuntimeError: no C++ compiler found)" in said
    a, b = load_file(tmp_path / "broken" / "model.safetensors"), load_file(tmp_path / "fast" / "model.safetensors")
    for k in a:  # eager after the failed try, compiled: same draws, the same weights up to float reassociation
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)

    torch._dynamo.reset()
    sampled = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "fast" / "model.safetensors"), "--n", "2",
                                  "--steps", "3", "--compile", "--out", str(tmp_path / "s2.png")])
    assert sampled.exit_code == 0 and "did not work" in sampled.output
    eager_vs_compiled = read_image(str(tmp_path / "s.png")).int() - read_image(str(tmp_path / "s2.png")).int()
    assert eager_vs_compiled.abs().max() <= 1  # the same pictures, up to rounding
