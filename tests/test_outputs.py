"""No command writes over what it reads (outputs.py): every command that takes files, each
output option pointed at each of its inputs (and inside each input folder), with and
without --overwrite; each is refused in one sentence, exit 1, and every input keeps its
SHA-256. Then the rules themselves, and the overwrite policy they share."""

import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcli.cli import app
from diffcli.files import sha256
from diffcli.outputs import FILE, FOLDER, IMAGE, MODEL, MODEL_FOLDER, Output, check
from diffcli.errors import UserError


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def inputs(tiny_run, tmp_path) -> dict:
    """A copy of a run folder (model, training state, config, an EMA snapshot), a folder of
    class folders, two images, a classifier, a config file and a diffusers folder."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "ema_snapshots").mkdir(exist_ok=True)
    (run / "ema_snapshots" / "step_0000010.safetensors").write_bytes(b"snapshot")
    data = tmp_path / "data"
    for k, colour in enumerate(("red", "blue")):
        (data / f"c{k}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(data / f"c{k}" / f"{i}.png")
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.new("RGB", (8, 8), "green").save(image)
    Image.new("L", (8, 8), 255).save(mask)
    clf = tmp_path / "clf.safetensors"
    clf.write_bytes(b"classifier")
    config = tmp_path / "config.yaml"
    shutil.copy(run / "config.yaml", config)
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    (pipe / "model_index.json").write_text("{}")
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    return dict(run=run, model=run / "model.safetensors", snapshot=run / "ema_snapshots" / "step_0000010.safetensors",
                snapshots=run / "ema_snapshots", data=data, data_image=data / "c0" / "0.png", image=image, mask=mask,
                clf=clf, config=config, pipe=pipe, weights=pipe / "unet" / "diffusion_pytorch_model.safetensors")


# command: (its arguments with {name} for an input, its output options, the inputs it reads, takes --overwrite)
COMMANDS = {
    "sample": (["sample", "--ckpt", "{model}"], ["--out", "--save-individual", "--trajectory"], ["model"], False),
    "compare": (["compare", "--ckpt", "{model}"], ["--out"], ["model"], False),
    "eval": (["eval", "--ckpt", "{model}", "--classifier", "{clf}", "--data", "{data}"], ["--pairs"],
             ["model", "clf", "data", "data_image"], False),
    "edit": (["edit", "{image}", "--ckpt", "{model}", "--label", "0", "--mask", "{mask}"], ["--out", "--save-individual"],
             ["image", "mask", "model"], False),
    "interpolate": (["interpolate", "--ckpt", "{model}"], ["--out"], ["model"], False),
    "export": (["export", "--ckpt", "{model}"], ["--out"], ["model"], True),
    "import": (["import", "{pipe}"], ["--out"], ["pipe", "weights"], True),
    "ema": (["ema", "--run", "{run}", "--length", "0.1"], ["--out"], ["model", "snapshot", "snapshots"], True),
    "distill": (["distill", "--teacher", "{model}", "--config", "{config}", "--max-steps", "1"], ["--out"],
                ["model", "config"], True),
    "train": (["train", "--data", "{data}", "--config", "{config}", "--max-steps", "1"], ["--out"],
              ["data", "data_image", "config"], True),
    "classifier train": (["classifier", "train", "--data", "{data}"], ["--out"], ["data", "data_image"], True),
    "noise-preview": (["noise-preview", "{image}"], ["--out", "--plot"], ["image"], False),
}


def targets(path: Path) -> list[Path]:
    """The input itself, and for a folder a new file and a new folder inside it."""
    return [path, path / "new.png", path / "new"] if path.is_dir() else [path]


@pytest.mark.parametrize("command", COMMANDS)
def test_no_output_option_can_land_on_an_input(inputs, command):
    template, options, reads, takes_overwrite = COMMANDS[command]
    args = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in template]
    files = [p for p in inputs["run"].parent.rglob("*") if p.is_file()]
    before = {p: sha256(p) for p in files}
    tried = 0
    for option in options:
        for name in reads:
            for target in targets(inputs[name]):
                for extra in ([["--overwrite"]] if takes_overwrite else []) + [[]]:
                    r = cli(*args, option, target, *extra)
                    said = " ".join(r.output.split())
                    assert r.exit_code == 1, f"{command} {option} {target}: {said}"
                    assert any(why in said for why in ("this command reads", "is a file", "is a folder", "must end in")), said
                    assert "Traceback" not in said
                    tried += 1
    assert tried >= len(options) * len(reads)
    assert {p: sha256(p) for p in files} == before
    assert sorted(p for p in inputs["run"].parent.rglob("*") if p.is_file()) == sorted(files)  # nothing new written


def test_a_hard_link_or_a_symbolic_link_to_an_input_is_that_input(tmp_path):
    source = tmp_path / "in.png"
    Image.new("RGB", (4, 4)).save(source)
    (tmp_path / "hard.png").hardlink_to(source)
    (tmp_path / "soft.png").symlink_to(source)
    (tmp_path / "dir").symlink_to(tmp_path, target_is_directory=True)
    for alias in ("hard.png", "soft.png", "dir/in.png", "./x/../in.png"):
        with pytest.raises(UserError, match="is the IMAGES this command reads"):
            check({"IMAGES": [source]}, [Output("--out", tmp_path / alias, IMAGE)])
    check({"IMAGES": [source]}, [Output("--out", tmp_path / "other.png", IMAGE)])  # beside it is fine


def test_an_output_folder_may_not_hold_an_input_and_an_output_may_not_sit_in_an_input_folder(tmp_path):
    (tmp_path / "run").mkdir()
    teacher = tmp_path / "run" / "model.safetensors"
    teacher.write_bytes(b"w")
    with pytest.raises(UserError, match="holds the --teacher this command reads"):
        check({"--teacher": teacher}, [Output("--out", tmp_path / "run", FOLDER)], overwrite=True)
    with pytest.raises(UserError, match="holds the --teacher"):
        check({"--teacher": teacher}, [Output("--out", tmp_path, FOLDER)])
    with pytest.raises(UserError, match="is inside the pipeline folder"):
        check({"the pipeline folder": tmp_path / "run"}, [Output("--out", tmp_path / "run" / "deep" / "x.safetensors", MODEL)])
    check({"--teacher": teacher}, [Output("--out", tmp_path / "student", FOLDER)])
    # A class folder that is a link: the data reads its target, so a run may not land there
    # (its pictures would be read as that class), however the link is reached; a loop is cut.
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cat").symlink_to(tmp_path / "photos" / "cat", target_is_directory=True)
    (tmp_path / "photos" / "cat" / "up").symlink_to(tmp_path / "data", target_is_directory=True)
    for out in (tmp_path / "data" / "cat" / "run", tmp_path / "photos" / "cat" / "run"):
        with pytest.raises(UserError, match="is inside --data"):
            check({"--data": tmp_path / "data"}, [Output("--out", out, MODEL_FOLDER)])
    check({"--data": tmp_path / "data"}, [Output("--out", tmp_path / "photos" / "run", MODEL_FOLDER)])
    (tmp_path / "data" / ".home").symlink_to(tmp_path, target_is_directory=True)  # hidden: not read, so not guarded
    check({"--data": tmp_path / "data"}, [Output("--out", tmp_path / "runs" / "x", MODEL_FOLDER)])


def test_no_command_writes_over_a_runs_own_weight_files(tmp_path):
    """A classifier or an import written as RUN/model.safetensors or RUN/train_state.safetensors
    with --overwrite broke the run (its resume read "not written by diffcli")."""
    (tmp_path / "run").mkdir()
    for name in ("model.safetensors", "train_state.safetensors"):
        (tmp_path / "run" / name).write_bytes(b"w")
    for name in ("model.safetensors", "train_state.safetensors"):
        with pytest.raises(UserError, match="is a training run's own file"):
            check({}, [Output("--out", tmp_path / "run" / name, MODEL)], overwrite=True)
    check({}, [Output("--out", tmp_path / "run" / "clf.safetensors", MODEL)], overwrite=True)  # beside them is fine
    (tmp_path / "run" / "train_state.safetensors").unlink()  # a model file alone is not a run: --overwrite replaces it
    check({}, [Output("--out", tmp_path / "run" / "model.safetensors", MODEL)], overwrite=True)


def test_one_overwrite_policy_for_model_files_and_folders(tmp_path):
    model, folder = tmp_path / "m.safetensors", tmp_path / "export"
    model.write_bytes(b"w")
    folder.mkdir()
    (folder / "old").write_text("x")
    with pytest.raises(UserError, match="already exists; pass --overwrite to replace it"):
        check({}, [Output("--out", model, MODEL)])
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        check({}, [Output("--out", folder, MODEL_FOLDER)])
    check({}, [Output("--out", model, MODEL), Output("--out", folder, MODEL_FOLDER)], overwrite=True)
    check({}, [Output("--out", tmp_path / "pictures.png", IMAGE)])  # pictures are replaced as before
    (tmp_path / "pictures.png").write_bytes(b"")
    check({}, [Output("--out", tmp_path / "pictures.png", IMAGE)])


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="must end in an image extension"):
        check({}, [Output("--out", tmp_path / "sheet.xyz", IMAGE)])
    with pytest.raises(UserError, match="is a file; give a folder"):
        check({}, [Output("--save-individual", tmp_path / "file", FOLDER)])
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check({}, [Output("--out", tmp_path, FILE)])
    with pytest.raises(UserError, match="cannot be made: .* is a file"):
        check({}, [Output("--out", tmp_path / "file" / "x.png", IMAGE)])


def test_two_outputs_may_not_name_one_file(tmp_path):
    with pytest.raises(UserError, match="--out and --trajectory both name"):
        check({}, [Output("--out", tmp_path / "x.png", IMAGE), Output("--trajectory", tmp_path / "./x.png", IMAGE)])
    check({}, [Output("--out", tmp_path / "x.png", IMAGE), Output("--trajectory", tmp_path / "y.png", IMAGE)])


def test_eval_without_data_keeps_its_pairs_out_of_the_models_own_training_folder(inputs, tmp_path):
    from safetensors.torch import load_file

    from diffcli.checkpoint import model_metadata, read_header, save_model

    meta = model_metadata(read_header(inputs["model"]))
    meta["config"]["data"]["name"] = str(inputs["data"])  # as if trained on the folder
    model = tmp_path / "folder-model.safetensors"
    save_model(model, load_file(str(inputs["model"])), meta["config"], meta["class_names"], meta["step"], meta["epoch"])
    target = inputs["data"] / "c0" / "0.png"
    before = sha256(target)
    r = cli("eval", "--ckpt", model, "--pairs", target)
    assert r.exit_code == 1 and "inside --data" in " ".join(r.output.split()) and sha256(target) == before, r.output


def test_an_interrupted_picture_leaves_the_old_file(tmp_path):
    """Ctrl-C while a picture or GIF is encoded: the file that was there stays whole
    (it was left at 0 bytes, written in place), and no temporary file is left beside it."""
    from diffcli.files import save_image as save

    target = tmp_path / "trajectory.gif"
    target.write_bytes(b"the old picture")

    class BreaksHalfway:
        def save(self, fp, **options):
            if isinstance(fp, (str, Path)):
                fp = open(fp, "wb")  # noqa: SIM115 (it is left open, as an interrupted encoder leaves it)
            fp.write(b"GIF89a, half of it")
            fp.flush()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save(BreaksHalfway(), target)
    assert target.read_bytes() == b"the old picture" and list(tmp_path.iterdir()) == [target]
