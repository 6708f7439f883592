"""The benchmark scripts still run (tiny settings; the numbers are not checked here), and
shape_fit's score tells real outlines from wrong ones.

The scripts run side by side, one thread each, so together they take about as long as the
slowest one alone.
"""

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_benchmark_scripts_run(mnist_root, tmp_path):
    from diffcli.classifier import Classifier, ClassifierConfig, save_classifier

    clf = tmp_path / "clf.safetensors"  # untrained: the scores are not checked here, only that every contender runs
    save_classifier(clf, Classifier(ClassifierConfig(1, 28, 10, width=4)), [str(i) for i in range(10)], "mnist",
                    {"test_accuracy": 0.1, "per_class_accuracy": [0.1] * 10, "test_images": 10})
    from diffcli.checkpoint import save_model
    from diffcli.config import build_config, to_dict
    from diffcli.unet import UNet

    import shutil

    # quality_steps reads MNIST from its own copy: two processes extracting the same archive at
    # once can see each other's half-written file (torchvision then tries to download)
    steps_root = shutil.copytree(mnist_root, tmp_path / "steps-data")
    cfg = build_config("tiny", None, {"data": {"name": "mnist", "root": str(steps_root)}})  # untrained, 28x28 digits
    cfg.model.image_size, cfg.model.in_channels, cfg.model.num_classes = 28, 1, 10
    model = tmp_path / "model.safetensors"
    save_model(model, UNet(cfg.model).state_dict(), to_dict(cfg), [str(i) for i in range(10)], 0, 0.0)
    from diffcli import posthoc

    run = tmp_path / "run"  # a run folder whose model is of step 2, with EMA snapshots of the untrained network
    save_model(run / "model.safetensors", UNet(cfg.model).state_dict(), to_dict(cfg), [str(i) for i in range(10)], 2, 0.0)
    for step in (1, 2):
        posthoc.save_snapshot(run, step, [UNet(cfg.model), UNet(cfg.model)])
    from diffcli.config import DistillConfig

    cfg.distill = DistillConfig(teacher=str(model), steps=2, guidance=2.0)  # an untrained "student" of it
    student = tmp_path / "student.safetensors"
    save_model(student, UNet(cfg.model).state_dict(), to_dict(cfg), [str(i) for i in range(10)], 0, 0.0)
    shapes_cfg = build_config("tiny", None, {})  # untrained, on 32x32 shapes
    shapes_model = tmp_path / "shapes.safetensors"
    from diffcli.shapes import SHAPES

    save_model(shapes_model, UNet(shapes_cfg.model).state_dict(), to_dict(shapes_cfg), list(SHAPES), 0, 0.0)
    rules_root = shutil.copytree(mnist_root, tmp_path / "rules-data")
    ema_root = shutil.copytree(mnist_root, tmp_path / "ema-data")
    knowledge_root = shutil.copytree(mnist_root, tmp_path / "knowledge-data")
    folder_root = shutil.copytree(mnist_root, tmp_path / "folder-data")
    flow_root = shutil.copytree(mnist_root, tmp_path / "flow-data")
    fd_root = shutil.copytree(mnist_root, tmp_path / "fd-data")
    flow_cfg = build_config("tiny", None, {"data": {"name": "mnist", "root": str(flow_root)}, "diffusion": {"objective": "flow"}})
    flow_cfg.model.image_size, flow_cfg.model.in_channels, flow_cfg.model.num_classes = 28, 1, 10
    flow_model = tmp_path / "flow.safetensors"  # untrained, as the v model beside it
    save_model(flow_model, UNet(flow_cfg.model).state_dict(), to_dict(flow_cfg), [str(i) for i in range(10)], 0, 0.0)
    scripts = {
        "guidance_rules.py": ["--ckpt", str(model), "--classifier", str(clf), "--weak", str(model), "--n", "2", "--steps", "2",
                              "--rules", "auto;1.5@0.28,5.42;auto 2", "--data-root", str(rules_root),
                              "--pictures", str(tmp_path / "rules")],
        "ema_lengths.py": ["--run", str(run), "--classifier", str(clf), "--lengths", "0.05,0.2", "--n", "2", "--steps", "2",
                           "--data-root", str(ema_root), "--pictures", str(tmp_path / "ema")],
        "quality_steps.py": ["--ckpt", str(model), "--classifier", str(clf), "--samplers", "ddim,heun", "--budgets", "2,6",
                             "--n", "2", "--out", str(tmp_path / "curve.png"), "--students", str(student)],
        "distill_speed.py": ["--teacher", str(model), "--student", str(student), "--n", "1", "--rounds", "1"],
        "train_throughput.py": ["--presets", "small", "--batch", "4", "--rounds", "1", "--steps", "1"],
        "shape_fit.py": ["--models", str(shapes_model), "--n", "1", "--steps", "2"],
        "sample_throughput.py": ["--n", "2", "--steps", "2", "--rounds", "1"],
        "quality_mnist.py": ["--minutes", "0.02", "--n", "2", "--sample-steps", "2", "--limit", "300", "--data-root",
                             str(mnist_root), "--classifier", str(clf), "--json", str(tmp_path / "q.json"),
                             "--pictures", str(tmp_path / "peers")],
        "size_cost.py": ["--presets", "tiny", "--sizes", "8,16", "--batch", "2", "--rounds", "1", "--steps", "1"],
        "flow_vs_v.py": ["--name", "MNIST", "--v", str(model), "--flow", str(flow_model), "--classifier", str(clf),
                         "--samplers", "euler", "--budgets", "4", "--n", "2", "--data-root", str(flow_root),
                         "--out", str(tmp_path / "flow.png")],
        "label_knowledge.py": [f"{model}=mnist", "--data-root", str(knowledge_root), "--n", "4", "--draws", "1",
                               "--timesteps", "500"],
        "fd_forms.py": ["--models", f"{model}@2", "--classifiers", str(clf), "--n", "2", "--steps", "2",
                        "--data-root", str(fd_root)],
        "class_folder.py": ["mnist", "--classes", "3,5", "--limit", "4", "--data-root", str(folder_root),
                            "--out", str(tmp_path / "pair")],
    }
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {name: subprocess.Popen([sys.executable, str(BENCH / name), *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=one_thread)
               for name, args in scripts.items()}
    out = {}
    for name, proc in running.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr[-2000:]}"
        out[name] = stdout
    # guided: 2 evaluations a step; heun's 2 steps on cosine are Euler from sigma > 80, then Euler to 0
    assert "| ddim | 1 | 2 |" in out["quality_steps.py"] and "| ddim | 3 | 6 |" in out["quality_steps.py"]
    assert "| heun | 2 | 4 |" in out["quality_steps.py"] and (tmp_path / "curve.png").stat().st_size > 0
    assert "| distilled | 2 | 2 |" in out["quality_steps.py"]  # a student: its own steps, one pass each
    assert "ratio teacher / student" in out["distill_speed.py"]
    rules = out["guidance_rules.py"]  # an untrained model: step 0, training unknown, so the default weight 2
    assert "| cfg | 2 |" in rules and "| cfg for σ in (0.28, 5.42] | 1.5 |" in rules and "| autoguidance against" in rules
    assert len(list((tmp_path / "rules").glob("*.png"))) == 3
    lengths = out["ema_lengths.py"]
    assert "| the run's own (" in lengths and "| post-hoc 0.05 (fit error" in lengths and "| post-hoc 0.2 (" in lengths
    assert len(list((tmp_path / "ema").glob("*.png"))) == 3
    assert "ratio diffcli / diffusers" in out["train_throughput.py"] and "718,211" in out["train_throughput.py"]
    assert "ratio diffcli / diffusers" in out["sample_throughput.py"]
    assert "whole process: diffcli sample" in out["sample_throughput.py"]
    fits = out["shape_fit.py"].splitlines()  # real images overlap their outlines; an untrained network's noise does not
    real_row, model_row = (next(line for line in fits if line.startswith(f"| {name}")) for name in ("real", shapes_model))
    assert min(map(float, real_row.split("|")[2:-1])) > 0.85 and float(model_row.split("|")[-2]) < 0.6
    for name in ("diffcli", "lucidrains", "diffusers", "real training images"):
        assert f"| {name} |" in out["quality_mnist.py"]
    assert len(list((tmp_path / "peers").glob("*.png"))) == 3
    flows = out["flow_vs_v.py"]  # guided: 2 evaluations a step
    assert "| v | euler | 2 | 4 |" in flows and "| flow | euler | 2 | 4 |" in flows
    assert (tmp_path / "flow.png").stat().st_size > 0
    assert "16/8: training" in out["size_cost.py"] and "| t = 500 | gain |" in out["label_knowledge.py"]
    assert f"| {model} at 2 | clf.safetensors | " in out["fd_forms.py"]  # five forms, each with its ratio to the floor
    assert out["fd_forms.py"].splitlines()[-1].count("×)") == 5
    from diffcli import data as D  # the folder reads back as --data reads it: two classes, both splits

    pair = D.load(str(tmp_path / "pair"))
    assert out["class_folder.py"].split() == ["train:", "8", "pictures", "test:", "8", "pictures"]
    assert pair.images.shape == (8, 1, 28, 28) and len(pair.class_names) == 2 and D.test_split(str(tmp_path / "pair")) is not None


def test_shape_fit_tells_an_outline_from_another():
    """Real squares and crosses fit their own outlines nearly perfectly, each other's
    poorly, and blurred (soft corners, as an undertrained model draws them) less well."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(BENCH))
    from shape_fit import fit

    from diffcli.shapes import SHAPES, draw

    images, labels = draw(32, 6, seed=6)
    square, cross = SHAPES.index("square"), SHAPES.index("cross")
    keep = (labels == square) | (labels == cross)
    images, labels = images[keep], labels[keep]
    box = torch.ones(3, 1, 5, 5) / 25
    blurred = F.conv2d(F.pad(images.float(), (2, 2, 2, 2), mode="replicate"), box, groups=3).round().to(torch.uint8)
    swapped = torch.where(labels == square, cross, square)
    r2, overlap = fit(torch.cat([images, images, blurred]), torch.cat([labels, swapped, labels]))
    r2, overlap = r2.split(len(labels)), overlap.split(len(labels))
    assert r2[0].min() > 0.9 and r2[1].max() < 0.8  # the fit itself: its own outline explains a real image
    assert overlap[0].min() > 0.85 and overlap[1].max() < 0.8
    # Per image the fit's grid (5°, half pixels) can happen to suit a blurred outline better
    # than the real one's exact pose, so the check is on most images and on the mean.
    assert (overlap[2] < overlap[0]).float().mean() >= 0.75 and (overlap[0] - overlap[2]).mean() > 0.03
