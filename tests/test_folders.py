"""Image folders and archives: which file is which class and split, the decoded-image
cache (reused, rebuilt when the source changes), and its memory map shared by processes."""

import gzip
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcli import data as D
from diffcli import folders
from diffcli.cli import app
from diffcli.errors import UserError

runner = CliRunner()


@pytest.mark.parametrize("names, splits, classes", [
    # class folders
    (["cat/1.png", "dog/2.png", "dog/sub/3.png"], {"train": [("cat/1.png", 0), ("dog/2.png", 1), ("dog/sub/3.png", 1)]}, ["cat", "dog"]),
    # one top folder wrapping train/ and test/ (the CIFAR-10 mirror's layout)
    (["top/test/dog/9.png", "top/train/cat/1.png", "top/train/dog/2.png"],
     {"train": [("top/train/cat/1.png", 0), ("top/train/dog/2.png", 1)], "test": [("top/test/dog/9.png", 1)]}, ["cat", "dog"]),
    # val/ serves as the test split; loose files are left out
    (["train/a/1.png", "train/b/2.png", "val/a/3.png", "train/4.png"],
     {"train": [("train/a/1.png", 0), ("train/b/2.png", 1)], "test": [("val/a/3.png", 0)]}, ["a", "b"]),
    # a loose picture beside the wrapped splits, or a folder beside them, does not turn them into classes
    (["top/train/c/1.png", "top/test/c/2.png", "top/preview.png", "4.png"],
     {"train": [("top/train/c/1.png", 0)], "test": [("top/test/c/2.png", 0)]}, ["c"]),
    (["train/c/1.png", "test/c/2.png", "samples/3.png", "4.png"],
     {"train": [("train/c/1.png", 0)], "test": [("test/c/2.png", 0)]}, ["c"]),
    # splits without class folders: one unlabelled class in each
    (["train/1.png", "test/2.png"], {"train": [("train/1.png", 0)], "test": [("test/2.png", 0)]}, []),
    # a class named "train" among other classes is a class, not a split
    (["bus/1.png", "train/2.png"], {"train": [("bus/1.png", 0), ("train/2.png", 1)]}, ["bus", "train"]),
    # no class folders: one unlabelled class; one wrapping folder holding only images is a class
    (["1.png", "2.png"], {"train": [("1.png", 0), ("2.png", 0)]}, []),
    (["cats/1.png", "cats/2.png"], {"train": [("cats/1.png", 0), ("cats/2.png", 0)]}, ["cats"]),
    # split folders in any case, and the MNIST-as-PNG mirrors' training/ and testing/
    (["Train/a/1.png", "TEST/a/2.png"], {"train": [("Train/a/1.png", 0)], "test": [("TEST/a/2.png", 0)]}, ["a"]),
    (["mnist_png/testing/7/2.png", "mnist_png/training/7/1.png"],
     {"train": [("mnist_png/training/7/1.png", 0)], "test": [("mnist_png/testing/7/2.png", 0)]}, ["7"]),
])
def test_layout(names, splits, classes):
    assert folders.layout(names) == (splits, classes)


@pytest.mark.parametrize("train", ["train/cat/1.png", "train/1.png"])  # (loose training images: no classes at all)
def test_layout_refuses_a_test_class_the_training_split_lacks(train):
    with pytest.raises(UserError, match="owl"):
        folders.layout([train, "test/owl/2.png"])


def make_tree(root: Path) -> Path:
    """top/{train,test}/{cat,dog}/N.png with a distinct colour per image, plus files to ignore."""
    for split, n in (("train", 3), ("test", 2)):
        for k, cls in enumerate(("cat", "dog")):
            (root / "top" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (30 * i, 100 * k, 7 if split == "test" else 200)).save(root / "top" / split / cls / f"{i}.png")
    (root / "top" / "README.txt").write_text("not an image")
    for hidden in (root / "top" / "train" / "cat" / ".hidden.png", root / "top" / "train" / ".thumbs" / "x" / "0.png"):
        hidden.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(hidden, format="PNG")  # readable, so only the name leaves it out
    return root / "top"


def archive(tree: Path, path: Path) -> Path:
    files = sorted(p for p in tree.rglob("*") if p.is_file())
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            for p in files:
                z.write(p, p.relative_to(tree.parent).as_posix())
            z.writestr("__MACOSX/top/train/cat/._0.png", b"resource fork, not an image")
    else:
        with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as t:
            t.add(tree, tree.name)
    return path


@pytest.mark.parametrize("kind", ["folder", "data.tar", "data.tar.gz", "data.zip"])
def test_folders_and_archives_give_the_same_splits(tmp_path, kind):
    tree = make_tree(tmp_path / "src")
    source = str(tree if kind == "folder" else archive(tree, tmp_path / kind))
    train, test = D.load(source), D.test_split(source)
    assert train.class_names == test.class_names == ["cat", "dog"]
    assert train.images.shape == (6, 3, 8, 8) and test.images.shape == (4, 3, 8, 8)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 0, 1, 1]
    assert (train.images[:, 2] == 200).all() and (test.images[:, 2] == 7).all()  # each split from its own folder
    assert train.images[4, :, 0, 0].tolist() == [30, 100, 200]  # dog/1.png


def test_a_test_split_of_another_size_leaves_the_training_size_alone(tmp_path):
    tree = make_tree(tmp_path / "src")
    for png in (tree / "test").rglob("*.png"):
        Image.open(png).resize((4, 4)).save(png)
    assert D.load(str(tree)).images.shape[1:] == D.test_split(str(tree)).images.shape[1:] == (3, 8, 8)  # was 32: "mixed"


def test_a_limit_on_a_folder_keeps_every_class(tmp_path):
    tree = make_tree(tmp_path / "src")
    kept = D.load(str(tree), limit=4)
    assert kept.labels.tolist() == [0, 0, 1, 1]  # cat 0-1 and dog 0-1, not the first four names: cat 0-2, dog 0
    assert kept.images[:, 0, 0, 0].tolist() == [0, 30, 0, 30]  # each class's first images (red = 30 x its number)


def test_a_source_without_a_test_folder_has_no_test_split(tmp_path):
    tree = make_tree(tmp_path / "src")
    shutil.rmtree(tree / "test")
    assert D.test_split(str(tree)) is None
    with pytest.raises(UserError, match="no test/ folder"):
        D.load(str(tree), split="test")


def test_cifar_archive_slice(cifar_slice):
    train, test = D.load(str(cifar_slice)), D.test_split(str(cifar_slice))
    assert train.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert train.images.shape == (120, 3, 32, 32) and test.images.shape == (40, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [4] * 10
    assert 90 < train.images.float().mean() < 160  # photos, not blank frames


def test_the_cache_is_reused_and_rebuilt_when_the_source_changes(tmp_path):
    tree = make_tree(tmp_path / "src")
    first = D.load(str(tree))
    assert first.origin.startswith("decoded into the cache")
    again = D.load(str(tree))
    assert again.origin.startswith("read from the cache") and torch.equal(again.images, first.images)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tree / "train" / "cat" / "0.png")  # same name, same size, new pixels
    changed = D.load(str(tree))
    assert changed.origin.startswith("decoded into the cache")
    assert changed.images[0, :, 0, 0].tolist() == [1, 2, 3]
    # an archive is keyed by its bytes too
    tar = archive(tree, tmp_path / "a.tar")
    assert D.load(str(tar)).origin.startswith("decoded")
    archive(make_tree(tmp_path / "other"), tar)
    assert D.load(str(tar)).origin.startswith("decoded")


def test_mixed_sizes_say_a_skipped_file_once(tmp_path, caplog):
    """Mixed sizes decode a second time at 32 px: the broken file's warning is not repeated."""
    for k, size in enumerate((8, 12)):
        (tmp_path / "mixed" / f"c{k}").mkdir(parents=True)
        Image.new("RGB", (size, size), (9, 9, 9)).save(tmp_path / "mixed" / f"c{k}" / "0.png")
    (tmp_path / "mixed" / "c0" / "1.png").write_bytes(b"nope")
    assert D.load(str(tmp_path / "mixed"), root=str(tmp_path / "root")).images.shape == (2, 3, 32, 32)
    assert caplog.text.count("skipping c0/1.png") == 1


@pytest.mark.parametrize("damage", ["cut", "meta", "gone"])
def test_a_damaged_cache_entry_is_decoded_again(tmp_path, caplog, damage):
    """A file of the entry cut short, meta.json damaged, or a file gone (a disk that filled or
    failed): a warning, and the source is decoded again into a whole entry (a traceback on
    every start before)."""
    tree = make_tree(tmp_path / "src")
    first = D.load(str(tree), root=str(tmp_path / "root")).images.clone()  # (a map of the file about to be cut)
    entry = next((tmp_path / "root" / "decoded").iterdir())
    if damage == "cut":
        (entry / "train-images.u8").write_bytes((entry / "train-images.u8").read_bytes()[:100])
    elif damage == "meta":
        (entry / "meta.json").write_text('{"splits": ')
    else:
        (entry / "test-labels.i64").unlink()
    again = D.load(str(tree), root=str(tmp_path / "root"))
    assert f"the decoded-image cache entry {entry} is damaged" in caplog.text
    assert again.origin.startswith("decoded into the cache") and torch.equal(again.images, first)
    assert D.test_split(str(tree), root=str(tmp_path / "root")).labels.tolist() == [0, 0, 1, 1]
    assert D.load(str(tree), root=str(tmp_path / "root")).origin.startswith("read from the cache")
    assert [p.name for p in (tmp_path / "root" / "decoded").iterdir()] == [entry.name]  # the damaged copy is gone


def test_an_image_size_has_its_own_cache_entry(tmp_path):
    tree = make_tree(tmp_path / "src")
    assert D.load(str(tree)).images.shape[-1] == 8
    resized = D.load(str(tree), image_size=16)
    assert resized.images.shape[-1] == 16 and resized.origin.startswith("decoded")


def test_a_read_only_data_root_decodes_into_memory(tmp_path, caplog):
    tree = make_tree(tmp_path / "src")
    root = tmp_path / "root"
    root.write_text("a file where the data root's folder should be: unwritable, even for root")
    data = D.load(str(tree), str(root))
    assert data.images.shape == (6, 3, 8, 8) and "could not be written" in data.origin
    assert "keeping the images in memory" in caplog.text


def test_an_unreadable_test_split_falls_back_to_holding_out(tmp_path, caplog):
    tree = make_tree(tmp_path / "src")
    for f in (tree / "test").rglob("*.png"):
        f.write_bytes(b"not a png")
    assert D.test_split(str(tree)) is None and "held out instead" in caplog.text


def test_eval_at_the_trained_size_reuses_the_cache_of_the_native_size(tmp_path):
    tree = make_tree(tmp_path / "src")
    D.load(str(tree))
    assert D.load(str(tree), image_size=8).origin.startswith("read from the cache")


def test_a_name_appended_twice_to_a_tar_is_one_image(tmp_path):
    tree = make_tree(tmp_path / "src")
    tar = archive(tree, tmp_path / "a.tar")
    with tarfile.open(tar, "a") as t:
        t.add(tree / "train" / "cat" / "0.png", "top/train/cat/0.png")
    assert D.load(str(tar)).images.shape[0] == 6


@pytest.mark.filterwarnings("ignore:Duplicate name")  # the name stored twice, on purpose
def test_a_windows_zip_with_a_damaged_member_and_a_hard_linked_tar(tmp_path, caplog):
    """Backslashes as separators (older Windows tools) are folders; a member that fails its
    checksum is skipped with a warning, as a corrupt image is; a name stored twice is one
    image; a tar's hard link is an image of its own, as in the folder it was made from."""
    tree = make_tree(tmp_path / "src")
    files = sorted(p.relative_to(tree.parent).as_posix() for p in tree.rglob("*") if p.is_file())
    zipped = tmp_path / "win.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for name in files + ["top/train/dog/0.png"]:
            z.writestr(name.replace("/", "\\"), (tmp_path / "src" / name).read_bytes())
    raw = bytearray(zipped.read_bytes())
    at = raw.index(b"IDAT")  # inside the first member, top/test/cat/0.png (stored, not deflated)
    raw[at + 8] ^= 0xFF
    zipped.write_bytes(bytes(raw))
    train, test = D.load(str(zipped)), D.test_split(str(zipped))
    assert train.class_names == ["cat", "dog"] and train.images.shape[0] == 6 and test.images.shape[0] == 3
    assert "top/test/cat/0.png" in caplog.text and "cannot be read" in caplog.text

    (tree / "train" / "dog" / "3.png").hardlink_to(tree / "train" / "dog" / "0.png")
    tar = tmp_path / "linked.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tree, "top")
    with tarfile.open(tar) as t:
        assert t.getmember("top/train/dog/3.png").islnk()
    assert D.load(str(tar)).images.shape[0] == D.load(str(tree)).images.shape[0] == 7


def test_members_named_from_the_root_or_with_dotdot_are_left_out_with_a_warning(tmp_path, caplog):
    """They would land outside the archive's folder (tar and unzip refuse them): not the data's
    images, never a class named "/" (as an absolute member made), never read silently."""
    tree = make_tree(tmp_path / "src")
    zipped = archive(tree, tmp_path / "data.zip")
    png = (tree / "train" / "cat" / "0.png").read_bytes()
    with zipfile.ZipFile(zipped, "a") as z:
        for name in ("/etc/x.png", "../up.png", "top/train/../../up2.png", "C:/win.png"):
            z.writestr(name, png)
    train = D.load(str(zipped))
    assert train.class_names == ["cat", "dog"] and train.images.shape[0] == 6
    assert "left out 4 image(s) lying outside the archive's own folders" in caplog.text


def test_a_zip_named_as_a_tar_is_one_sentence_that_says_so(tmp_path):
    wrong = archive(make_tree(tmp_path / "src"), tmp_path / "data.zip").rename(tmp_path / "data.tar.gz")
    with pytest.raises(UserError, match=r"it is a zip file: name it \.zip") as e:
        D.load(str(wrong))
    assert "\n" not in str(e.value)


def test_a_tar_damaged_past_its_first_header_says_how_much_was_read(tmp_path, caplog):
    """Python's tarfile stops at a damaged header as if the archive ended there; the images
    before it are used, and a warning says the archive is damaged after them."""
    whole = tmp_path / "whole.tar.gz"
    with tarfile.open(whole, "w:gz", format=tarfile.USTAR_FORMAT) as t:  # no pax header before a member:
        t.add(make_tree(tmp_path / "src"), "top")  # one damaged there is refused (a ReadError, one sentence)
    assert D.load(str(whole)).images.shape[0] == 6 and "damaged" not in caplog.text
    plain = bytearray(gzip.decompress(whole.read_bytes()))
    at = plain.index(b"top/train/dog/1.png")  # a header's name, in the archive's sorted order
    plain[at + 148] ^= 0x11  # its checksum field
    damaged = tmp_path / "damaged.tar.gz"
    damaged.write_bytes(gzip.compress(bytes(plain)))
    train = D.load(str(damaged), root=str(tmp_path / "root"))
    assert train.class_names == ["cat", "dog"] and train.images.shape[0] == 4  # dog/1 and dog/2 are lost
    assert f"the archive '{damaged}' is damaged after its first" in caplog.text
    caplog.clear()  # the test split, read from the entry just written: no second word in one process
    assert D.test_split(str(damaged), root=str(tmp_path / "root")) is not None and not caplog.text
    from diffcli import imagecache

    imagecache._REMINDED.clear()  # a later start, from the cache: it still says what was lost, once
    assert D.load(str(damaged), root=str(tmp_path / "root")).images.shape[0] == 4
    D.test_split(str(damaged), root=str(tmp_path / "root"))
    assert caplog.text.count(f"when '{damaged}' was decoded into the cache: the archive") == 1
    caplog.clear()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[:-12])  # the gzip stream's end and a little of the end blocks
    assert D.load(str(cut), root=str(tmp_path / "root")).images.shape[0] == 6
    assert f"the archive '{cut}' ends early, after its" in caplog.text


def test_a_link_whose_target_is_gone_is_left_out_with_a_warning(tmp_path, caplog):
    """As a hidden file is: the images beside it train, the warning names it, and the
    source's digest (its cache key) leaves it out too, so restoring the target rebuilds."""
    tree = make_tree(tmp_path / "src")
    (tree / "train" / "cat" / "9.png").symlink_to(tmp_path / "gone.png")
    train = D.load(str(tree), root=str(tmp_path / "root"))
    assert train.images.shape[0] == 6 and "left out 1 image(s) lying behind links whose target is gone, such as train/cat/9.png" in caplog.text
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "gone.png")
    assert D.load(str(tree), root=str(tmp_path / "root")).images.shape[0] == 7


def test_a_broken_archive_is_one_sentence(tmp_path):
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08 this is not gzip data")
    with pytest.raises(UserError, match="cannot read the archive"):
        D.load(str(bad))


_TWO_PROCESSES = """
import sys, time
from pathlib import Path
from diffcli import data as D
images = D.load(sys.argv[1]).images
int(images.sum())  # touch every page
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():  # hold the map until the other process has touched its own
    time.sleep(0.02)
private = shared = 0
mapped = False
for line in open("/proc/self/smaps"):
    if "-images.u8" in line:
        mapped = True
    elif mapped and line.split()[0] in ("Private_Clean:", "Private_Dirty:"):
        private += int(line.split()[1])
    elif mapped and line.split()[0] in ("Shared_Clean:", "Shared_Dirty:"):
        shared += int(line.split()[1])
    elif mapped and line.split()[0] == "VmFlags:":
        mapped = False
print(private, shared)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_two_processes_share_one_copy_of_the_pixels(tmp_path):
    root = tmp_path / "src"
    for i in range(100):  # 100 images of 3x32x32: 300 KiB, 75 pages
        (root / "c").mkdir(parents=True, exist_ok=True)
        Image.effect_noise((32, 32), 60 + i % 50).convert("RGB").save(root / "c" / f"{i:03}.png")
    D.load(str(root))  # build the cache first, as rank 0 does under torchrun
    a, b = tmp_path / "a", tmp_path / "b"  # the children inherit the test's isolated cache (XDG_CACHE_HOME)
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(root), str(mine), str(other)],
                              stdout=subprocess.PIPE, text=True) for mine, other in ((a, b), (b, a))]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        private, shared = map(int, out.split())
        assert shared >= 280 and private <= 8, (private, shared)  # KiB: all 300 shared, none copied


def test_train_and_classifier_use_the_archive_splits(cifar_slice, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(cifar_slice), "--preset", "tiny", "--max-steps", "2",
                                 "--sample-every", "100", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "120" in result.output and "decoded into the cache" in " ".join(result.output.split())
    clf = tmp_path / "clf.safetensors"
    result = runner.invoke(app, ["classifier", "train", "--data", str(cifar_slice), "--epochs", "1", "--width", "4",
                                 "--out", str(clf)])
    assert result.exit_code == 0, result.output
    assert "120 training images, 40 test images (test split)" in " ".join(result.output.split())


def test_cifar_upsampled_to_64_works_through_the_commands(cifar_slice, tmp_path):
    """--image-size 64, as this project's seed trained: the run, its classifier, and the
    commands that read them all work at 64 px (the presets name levels, not sizes)."""
    def ok(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    run, clf = tmp_path / "run", tmp_path / "clf.safetensors"
    ok("train", "--data", cifar_slice, "--image-size", "64", "--preset", "tiny", "--max-steps", "1", "--out", run)
    model = run / "model.safetensors"
    assert '"image_size": 64,' in ok("inspect", model, "--json")
    ok("sample", "--ckpt", model, "--label", "cat,ship", "--n", "1", "--steps", "2", "--out", tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size == (66 + 2, 2 * 66 + 2)  # a row per label of one 64-px cell, padded
    ok("classifier", "train", "--data", cifar_slice, "--image-size", "64", "--epochs", "1", "--width", "4", "--out", clf)
    assert "classifier-FD" in ok("eval", "--ckpt", model, "--classifier", clf, "--n", "2", "--steps", "2", "--no-memorisation")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    ok("edit", tmp_path / "red.png", "--ckpt", model, "--label", "ship", "--steps", "2", "--n", "1", "--out", tmp_path / "e.png")
    ok("interpolate", "--ckpt", model, "--label", "cat", "--frames", "2", "--steps", "2", "--out", tmp_path / "i.gif")
