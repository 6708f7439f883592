"""Every picture the tool draws, made by the CLI from a tiny model and checked to be a
valid image of the size its layout implies (computed here, not eyeballed)."""

import json
import sys

from PIL import Image
from typer.testing import CliRunner

from diffcli.cli import app
from diffcli.figures import GAP, HEADER, trajectory_size
from diffcli.images import PAD

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def grid_size(n, ncol, h, w):
    nrow = -(-n // ncol)
    return ncol * (w + PAD) + PAD, nrow * (h + PAD) + PAD


def test_trajectory_strip(tiny_run, tmp_path):
    out = tmp_path / "traj.png"
    r = run("sample", "--ckpt", tiny_run / "model.safetensors", "--label", "0,3", "--n", "2", "--steps", "10",
            "--trajectory", out, "--frames", "4", "--out", tmp_path / "s.png")
    img = Image.open(out)
    img.load()
    scale = 2  # 32-px images are doubled so the 'x0 @ 999' captions fit
    assert img.size == trajectory_size(4, 4, 32 * scale, 32 * scale)
    # by hand: 5 x_t columns (4 steps + final) and 4 x0 columns of 66 px, a gap, a header
    assert img.size == (PAD + 5 * 66 + GAP + 4 * 66, HEADER + PAD + 4 * 66)
    assert "(t = 999, 699, 399, 99)" in " ".join(r.output.split())


def test_trajectory_gif(tiny_run, tmp_path):
    out = tmp_path / "traj.gif"
    run("sample", "--ckpt", tiny_run / "model.safetensors", "--label", "1", "--n", "3", "--sampler", "dpm++",
        "--steps", "6", "--trajectory", out, "--frames", "3", "--out", tmp_path / "s.png")
    gif = Image.open(out)
    assert gif.format == "GIF" and gif.n_frames == 3 + 1  # kept steps, then the final samples
    w, h = grid_size(3, 1, 32, 64)  # each image's x_t and x0 side by side, one per row
    assert gif.size == (2 * w, 2 * h)


def test_trajectory_needs_png_or_gif(tiny_run, tmp_path):
    r = runner.invoke(app, ["sample", "--ckpt", str(tiny_run / "model.safetensors"), "--trajectory", str(tmp_path / "t.jpg")])
    assert r.exit_code == 1 and "must end in .png or .gif" in r.output


def test_compare_sheet_with_guidance_sweep(tiny_run, tmp_path):
    out = tmp_path / "cmp.png"
    r = run("compare", "--ckpt", tiny_run / "model.safetensors", "--samplers", "ddim,dpm++,euler", "--steps", "2,5,9,5",
            "--guidance", "0,1,4,1", "--label", "star", "--n", "3", "--out", out)  # a repeated value is one row or column
    sheet = Image.open(out)
    rows, cols = 2 * 3, 3
    cell_w, cell_h = grid_size(3, 3, 32, 32)
    cell_w, cell_h = 2 * cell_w, 2 * cell_h  # enlarged for the captions
    assert sheet.size == (cols * cell_w + PAD * (cols + 1), rows * (cell_h + HEADER) + PAD * (rows + 1))
    assert "6 rows x 3 columns" in " ".join(r.output.split())


def test_compare_puts_ddpm_in_the_T_column_only(tiny_run, tmp_path):
    out = tmp_path / "cmp.png"
    run("compare", "--ckpt", tiny_run / "model.safetensors", "--samplers", "ddpm,ddim", "--steps", "3",
        "--n", "1", "--guidance", "1", "--out", out)  # one pass per step: the layout is what is checked
    sheet = Image.open(out)
    cell_w, cell_h = (2 * v for v in grid_size(1, 1, 32, 32))
    assert sheet.size == (2 * cell_w + 3 * PAD, 2 * (cell_h + HEADER) + 3 * PAD)  # columns: 3 steps and T


def test_schedule_plot(tmp_path):
    out = tmp_path / "schedules.png"
    r = run("noise-preview", "--plot", out, "--timesteps", "512")
    assert Image.open(out).size == (900, 350)  # 9 x 3.5 inches at 100 dpi
    assert "linear, cosine" in r.output


def test_plots_say_so_when_matplotlib_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    r = runner.invoke(app, ["noise-preview", "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 1 and "pip install 'diffcli[plots]'" in " ".join(r.output.split())
    assert "Traceback" not in r.output


def test_run_folder_gets_a_loss_curve_and_inspect_reads_the_folder(tiny_run):
    assert Image.open(tiny_run / "loss.png").size == (700, 350)
    info = json.loads(run("inspect", tiny_run, "--json").output)
    assert info["last_step"] == 12 and info["latest_grid"].endswith("samples/latest.png")
    assert info["loss_curve"].endswith("loss.png") and info["training_step"] == 12


def test_a_loss_curve_of_one_line_draws_without_a_warning(tmp_path):
    """A run of fewer steps than a metrics line has one point: its log axis had no span for
    some values (matplotlib's divide-by-zero warning in the run's output; 0.2 itself draws)."""
    import warnings

    from diffcli.plots import loss_curve

    (tmp_path / "m.jsonl").write_text(json.dumps({"step": 2, "loss": 0.20366254448890686, "lr": 2e-4, "images_per_s": 9.0, "elapsed_s": 0.1}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loss_curve(tmp_path / "m.jsonl", tmp_path / "loss.png") == tmp_path / "loss.png"


def test_preflight_table_and_warnings(tmp_path):
    from diffcli.files import save_image as save
    from diffcli.images import to_pil
    import torch

    for cls, count in (("few", 2), ("many", 9)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(count):
            save(to_pil(torch.full((3, 8, 8), 20 * i, dtype=torch.uint8)), tmp_path / "data" / cls / f"{i}.png")
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "data"), "--preset", "tiny", "--image-size", "8",
                            "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "images │ 11" in text or "images 11" in text.replace("│", "")
    assert "few 2, many 9" in text
    assert "unbalanced" in text and "memorise" in text
