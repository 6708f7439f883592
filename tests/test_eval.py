"""`diffcli eval` and the maths under it, on inputs whose answers are known."""

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli import data as D
from diffcli import evaluation as E
from diffcli.classifier import train_classifier
from diffcli.cli import app
from diffcli.metrics import nearest_neighbours

runner = CliRunner()


def test_nearest_neighbours_match_a_brute_force_search():
    g = torch.Generator().manual_seed(0)
    queries, pool = torch.rand(50, 30, generator=g), torch.rand(400, 30, generator=g)
    dist, idx = nearest_neighbours(queries, pool, chunk=7)
    full = torch.cdist(queries.double(), pool.double())
    assert torch.equal(idx, full.argmin(1))
    assert torch.allclose(dist.double(), full.min(1).values, atol=1e-5)


def test_a_copy_is_at_distance_zero_not_at_the_cancellation_error():
    pool = torch.rand(100, 784, generator=torch.Generator().manual_seed(1)) * 255
    dist, idx = nearest_neighbours(pool[[3, 70]], pool)
    assert idx.tolist() == [3, 70] and dist.abs().max() == 0


@pytest.fixture(scope="module")
def shapes_sets():
    train, test = D.load("shapes", limit=3000), D.load("shapes", split="test", limit=1000)
    return train, test


def test_memorisation_flags_copies_and_passes_new_real_images(shapes_sets):
    train, test = shapes_sets
    copies = E.memorisation(train.images[:200], train.images, test.images)
    assert copies["nn_distance_generated"] == 0 and copies["nn_ratio"] == 0 and copies["close_share"] == 1
    assert torch.equal(copies["nearest"], torch.arange(200))
    fresh = E.memorisation(test.images[500:700], train.images, test.images[:500])
    assert 0.8 < fresh["nn_ratio"] < 1.25  # new real images are as far from the training set as real images are
    assert fresh["close_share"] < 0.05  # the 1st percentile of the reference: about 1% of fresh images fall below it


def test_class_fidelity_of_real_images_is_the_classifiers_own_accuracy(shapes_sets):
    train, test = shapes_sets
    clf, scores = train_classifier(train, test, epochs=2, width=8)
    fid = E.class_fidelity(clf, test.images, test.labels, test.images, floor_images=train.images[:1000])
    assert fid["class_accuracy"] == pytest.approx(scores["test_accuracy"], abs=1e-6)
    assert fid["per_class_accuracy"] == pytest.approx(scores["per_class_accuracy"], abs=1e-6)
    assert abs(fid["classifier_fd"]) < 1e-6  # the same images: distance 0
    assert fid["classifier_fd_real_floor"] > 0
    # Images labelled with the wrong class score what the classifier gets wrong, about nothing.
    wrong = E.class_fidelity(clf, test.images, (test.labels + 1) % 10, test.images)
    assert wrong["class_accuracy"] < 1 - scores["test_accuracy"] + 0.05


@pytest.mark.parametrize("fd, warned", [(0.7, True), (1.4, False)])
def test_a_classifier_fd_below_the_real_floor_is_called_bias(fd, warned, capsys):
    from diffcli.cli.evaluate import _print_report
    report = dict(images=500, model="m.safetensors", sampler="ddim", steps=50, eta=0.0, guidance=1.85,
                  guidance_interval=None, seed=0, sampling_s=1.0, device="cpu", class_accuracy=1.0,
                  classifier=dict(test_accuracy=0.9998), classifier_fd=fd, classifier_fd_real_floor=1.33)
    _print_report(report)
    assert ("below the real floor" in " ".join(capsys.readouterr().out.split())) == warned


def test_eval_cli_reports_every_metric_as_json(tiny_run, shapes_classifier, tmp_path):
    pairs = tmp_path / "pairs.png"
    r = runner.invoke(app, ["eval", "--ckpt", str(tiny_run / "model.safetensors"), "--classifier", str(shapes_classifier),
                            "--n", "3", "--steps", "4", "--real-n", "300", "--pairs", str(pairs), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["images"] == 30 and report["steps"] == 4 and report["sampler"] == "ddim"
    assert 0 <= report["class_accuracy"] <= 1 and len(report["per_class_accuracy"]) == 10
    assert report["classifier_fd"] > report["classifier_fd_real_floor"] > 0  # 12 steps of training is far from real
    assert report["nn_distance_generated"] > 0 and 0 <= report["close_share"] <= 1
    sheet = Image.open(pairs)
    assert sheet.width > 4 * 2 * 48 and sheet.height > 4 * 48  # 4 x 4 pairs of 48-px images (32 px enlarged)
    table = runner.invoke(app, ["eval", "--ckpt", str(tiny_run / "model.safetensors"), "--classifier", str(shapes_classifier),
                                "--n", "2", "--steps", "2", "--eta", "1", "--real-n", "100", "--no-memorisation", "--device", "cpu"])
    assert table.exit_code == 0 and "class accuracy" in table.output and "classifier-FD" in table.output
    assert "ddim 2 steps, eta 1," in " ".join(table.output.split())  # what was measured is what `sample --eta 1` draws


def test_eval_refuses_a_classifier_for_other_images(tiny_run, tmp_path):
    from diffcli.classifier import Classifier, ClassifierConfig, save_classifier

    clf = tmp_path / "mnist-like.safetensors"
    save_classifier(clf, Classifier(ClassifierConfig(1, 28, 10, width=4)), [str(i) for i in range(10)], "mnist",
                    {"test_accuracy": 0.9, "per_class_accuracy": [0.9] * 10, "test_images": 10})
    r = runner.invoke(app, ["eval", "--ckpt", str(tiny_run / "model.safetensors"), "--classifier", str(clf), "--n", "2"])
    assert r.exit_code == 1 and "28x28x1" in r.output and "Traceback" not in r.output


def test_eval_warns_of_a_classifier_that_names_other_classes(tiny_run, tmp_path, caplog):
    """Same image size and class count, other classes (an MNIST judge on Fashion-MNIST):
    accuracy by class number means nothing, so eval says so."""
    from diffcli.checkpoint import load_model
    from diffcli.classifier import Classifier, ClassifierConfig, save_classifier

    clf = tmp_path / "other.safetensors"
    save_classifier(clf, Classifier(ClassifierConfig(3, 32, 10, width=4)), [f"kind{i}" for i in range(10)], "elsewhere",
                    {"test_accuracy": 0.9, "per_class_accuracy": [0.9] * 10, "test_images": 10})
    _, cfg, meta = load_model(tiny_run / "model.safetensors", "cpu")
    E._matching_classifier(clf, cfg, meta, "shapes", "cpu")
    assert "(kind0, kind1, kind2, kind3, kind4, ...) are not the model's (circle, square," in caplog.text
    caplog.clear()
    save_classifier(clf, Classifier(ClassifierConfig(3, 32, 10, width=4)), meta["class_names"], "shapes",
                    {"test_accuracy": 0.9, "per_class_accuracy": [0.9] * 10, "test_images": 10})
    E._matching_classifier(clf, cfg, meta, "shapes", "cpu")
    assert "not the model's" not in caplog.text


def test_eval_of_a_folder_model_when_too_little_or_nothing_is_left_to_compare(tmp_path):
    """Ten images leave one held out: no covariance, so one sentence instead of a NaN FD;
    and a model whose training folder is gone says so, not "--data is not a folder"."""
    folder = tmp_path / "ten"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (25 * i, 0, 0)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(folder), "--preset", "tiny", "--max-steps", "1", "--out", str(run)])
    assert r.exit_code == 0, r.output
    ev = ["eval", "--ckpt", str(run / "model.safetensors"), "--n", "2", "--steps", "2"]
    r = runner.invoke(app, ev)
    assert r.exit_code == 1 and "leaves 1 real image(s)" in r.output and "at least 2" in r.output
    shutil.rmtree(folder)
    r = runner.invoke(app, ev)
    assert r.exit_code == 1 and f"this model's data '{folder}' (as its config names it) is not there; pass --data" in " ".join(r.output.split())


def test_json_reports_carry_no_nan():
    from diffcli.cli._common import as_json_text

    report = {"fd": float("nan"), "per_class": [0.5, float("inf"), None], "inner": {"x": -float("inf"), "n": 3}}
    assert json.loads(as_json_text(report), parse_constant=lambda c: pytest.fail(c)) == {"fd": None, "per_class": [0.5, None, None],
                                                                      "inner": {"x": None, "n": 3}}


@pytest.mark.parametrize("args, message", [
    (["--n", "1"], "--n must be at least 2"),
    (["--sampler", "lms"], "unknown sampler"),
    (["--steps", "5000"], "--steps must be between"),
    (["--no-memorisation"], "nothing to measure"),
    (["--real-n", "1"], "--real-n must be at least 2"),
    (["--eta", "-1"], "--eta must be"),
])
def test_eval_bad_options_get_one_sentence(tiny_run, args, message):
    r = runner.invoke(app, ["eval", "--ckpt", str(tiny_run / "model.safetensors"), *args])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


# --- Inception FID ------------------------------------------------------------------

def test_fid_without_weights_or_network_says_where_to_put_them(tiny_run, monkeypatch):
    from diffcli import inception

    monkeypatch.setenv("TORCH_HOME", "/nonexistent/torch-home")
    monkeypatch.setattr(inception, "WEIGHTS_URL", "http://127.0.0.1:9/weights-inception.pth")  # refused at once, offline or not
    r = runner.invoke(app, ["eval", "--ckpt", str(tiny_run / "model.safetensors"), "--fid", "--n", "2", "--steps", "2"])
    assert r.exit_code == 1, r.output
    assert "--inception-weights" in r.output and "hub" in r.output and "Traceback" not in r.output


def test_a_pickled_program_is_refused_as_weights(tiny_run, tmp_path):
    import pickle

    pwned = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (exec, (f"open({str(pwned)!r}, 'w').write('x')",))

    bad = tmp_path / "weights.pth"
    bad.write_bytes(pickle.dumps(Boom()))
    r = runner.invoke(app, ["eval", "--ckpt", str(tiny_run / "model.safetensors"), "--fid", "--inception-weights", str(bad),
                            "--n", "2", "--steps", "2"])
    assert r.exit_code == 1 and "can read safely" in r.output and "Traceback" not in r.output
    assert not pwned.exists()


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """Inception-v3 with random weights, saved as torch-fidelity's weights file would be: the real
    network and code path, without the 95 MB download."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    original = torch.nn.Module.load_state_dict
    torch.nn.Module.load_state_dict = lambda self, *a, **k: None
    old_url = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        torch.nn.Module.load_state_dict = original
        fe.load_state_dict_from_url = old_url
    for m in net.modules():  # He init keeps the activations' scale through 90+ layers (torch's default shrinks it to ~1e-8)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(net.state_dict(), path)
    return path


def test_fid_of_a_set_with_itself_is_zero_and_real_statistics_are_cached(random_inception):
    from diffcli import inception

    net, digest = inception.load_inception(random_inception)
    images = D.load("shapes", split="test", limit=12).images
    mu, cov, cached = inception.real_stats(net, digest, "shapes-test12", lambda: images)
    assert not cached
    assert abs(inception.fid(net, images, mu, cov)) < 1e-3
    assert inception.fid(net, images.flip(-1).roll(5, -2), mu, cov) > 1e-3  # a changed set is not at 0
    never = lambda: pytest.fail("the cached statistics should have been used")  # noqa: E731
    mu2, cov2, cached = inception.real_stats(net, digest, "shapes-test12", never)
    assert cached and torch.equal(mu, mu2) and torch.equal(cov, cov2)
    gray = inception.features(net, images[:2, :1])
    assert torch.allclose(gray, inception.features(net, images[:2, :1].expand(-1, 3, -1, -1)))


def test_eval_cli_with_fid(tiny_run, random_inception):
    args = ["eval", "--ckpt", str(tiny_run / "model.safetensors"), "--fid", "--inception-weights", str(random_inception),
            "--n", "2", "--steps", "2", "--real-n", "10", "--no-memorisation", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert report["fid"] > 0 and "computed now" in report["fid_reference"]
    assert "cached" in json.loads(runner.invoke(app, args).output)["fid_reference"]
