"""`dataset_tools.py convert` on a synthetic ImageNet-like tree with bad files (data/convert.py)."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

import data
import data.convert as convert_mod
from data.convert import convert_dataset
from conftest import read_tree


def make_tree(root) -> dict:
    """Three classes (one empty), good JPEG/PNGs, and every kind of bad file. Returns facts."""
    rng = np.random.default_rng(0)
    a, b = os.path.join(root, "a_cls"), os.path.join(root, "b_cls")
    for d in (a, b, os.path.join(root, "c_empty")):
        os.makedirs(d)
    for i in range(3):
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(a, f"a{i}.jpg"), quality=95)
    small = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    Image.fromarray(np.kron(small, np.ones((2, 2, 1), dtype=np.uint8))).save(os.path.join(b, "checker.png"))
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(os.path.join(b, "cmyk.jpg"))
    with open(os.path.join(b, "corrupt.jpg"), "wb") as f:
        f.write(b"this is not a JPEG at all")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(os.path.join(b, "gray.jpg"))
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).convert("P").save(os.path.join(b, "palette.png"))
    Image.fromarray(np.zeros((40, 40, 4), dtype=np.uint8)).save(os.path.join(b, "rgba.png"))  # transparent black
    Image.fromarray(rng.integers(0, 256, (7, 10, 3), dtype=np.uint8)).save(os.path.join(b, "tiny.png"))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="jpeg")
    with open(os.path.join(b, "trunc.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    with open(os.path.join(b, "notes.txt"), "w") as f:
        f.write("not an image")
    with open(os.path.join(root, "README.txt"), "w") as f:
        f.write("top-level file")
    # candidates in order: a0 a1 a2 | checker cmyk corrupt gray palette rgba tiny trunc
    return {"small": small, "good": [0, 1, 2, 3, 4, 6, 7, 8, 9], "labels": [0, 0, 0, 1, 1, 1, 1, 1, 1]}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw") / "train"
    facts = make_tree(str(root))
    return str(root), facts


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
    src, facts = tree
    dest = str(tmp_path_factory.mktemp("conv") / "images")
    summary = convert_dataset(src, dest, resolution=(32, 32), workers=2, progress=False)
    return dest, summary



def _png(dest, idx):
    return np.asarray(Image.open(os.path.join(dest, f"{idx // 1000:05d}/img{idx:08d}.png")))


def test_layout_labels_and_report(tree, converted):
    src, facts = tree
    dest, summary = converted
    with open(os.path.join(dest, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["labels"] == [[f"00000/img{i:08d}.png", lab] for i, lab in zip(facts["good"], facts["labels"])]
    assert meta["classes"] == ["a_cls", "b_cls", "c_empty"]
    with open(os.path.join(dest, "conversion_report.json")) as f:
        report = json.load(f)
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"b_cls/corrupt.jpg", "b_cls/trunc.jpg", "b_cls/notes.txt", "README.txt"}
    assert "identify" in reasons["b_cls/corrupt.jpg"]
    assert "truncated" in reasons["b_cls/trunc.jpg"]
    assert "not an image" in reasons["b_cls/notes.txt"]
    assert "class folder" in reasons["README.txt"]
    assert report["empty_classes"] == ["c_empty"] and report["status"] == "complete"
    assert summary["written"] == 9 and summary["num_classes"] == 3


def test_pixels(tree, converted):
    src, facts = tree
    dest, _ = converted
    # checker.png (idx 3) is 128x64 of 2x2 blocks: one box halving gives `small`, crop columns 16..47.
    np.testing.assert_array_equal(_png(dest, 3), facts["small"][:, 16:48])
    # a0.jpg (idx 0): 48x40 -> bicubic to round(48 * 0.8) = 38 x 32 -> crop columns 3..34.
    ref = Image.open(os.path.join(src, "a_cls", "a0.jpg")).convert("RGB").resize((38, 32), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(_png(dest, 0), np.asarray(ref)[:, 3:35])
    for idx in facts["good"]:
        img = Image.open(os.path.join(dest, f"00000/img{idx:08d}.png"))
        assert img.mode == "RGB" and img.size == (32, 32)
    gray = _png(dest, 6)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (_png(dest, 8) == 255).all()  # fully transparent -> white background


def test_open_dataset_reads_images(tree, converted):
    src, facts = tree
    dest, _ = converted
    ds = data.open_dataset(dest)
    assert ds.kind == "images" and len(ds) == 9 and ds.num_classes == 3 and ds.item_shape == (3, 32, 32)
    x, y = ds[0]
    assert x.dtype.is_floating_point is False and y == 0
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), _png(dest, 0))


def test_interrupted_run_resumes_to_identical_output(tree, converted, tmp_path, monkeypatch):
    src, _ = tree
    dest_full, _ = converted
    dest = str(tmp_path / "images")
    real = convert_mod.convert_one
    calls = []

    def dies_on_fifth(*args):
        calls.append(args)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(convert_mod, "convert_one", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        convert_dataset(src, dest, resolution=(32, 32), workers=1, progress=False)
    monkeypatch.setattr(convert_mod, "convert_one", real)
    assert not os.path.exists(os.path.join(dest, "dataset.json"))
    with open(os.path.join(dest, "conversion_report.json")) as f:
        assert json.load(f)["status"] == "incomplete"
    with open(os.path.join(dest, "00000", ".tmp-123-img00000004.png"), "wb") as f:
        f.write(b"half a file")  # what a kill during a write leaves

    summary = convert_dataset(src, dest, resolution=(32, 32), workers=2, progress=False)
    assert summary["already_done"] == 4 and summary["written"] == 5
    assert read_tree(dest) == read_tree(dest_full)

    with pytest.raises(ValueError, match="other settings"):
        convert_dataset(src, dest, resolution=(16, 16), workers=1, progress=False)


def test_zip_source_and_zip_dest(tree, converted, tmp_path):
    src, _ = tree
    dest_full, _ = converted
    zsrc = str(tmp_path / "train.zip")
    with zipfile.ZipFile(zsrc, "w") as zf:
        for root, dirs, files in os.walk(src):
            for d in dirs:
                zf.write(os.path.join(root, d), os.path.relpath(os.path.join(root, d), src) + "/")
            for name in files:
                zf.write(os.path.join(root, name), os.path.relpath(os.path.join(root, name), src))
    zdest = str(tmp_path / "images.zip")
    summary = convert_dataset(zsrc, zdest, resolution=(32, 32), workers=1, progress=False)
    assert summary["empty_classes"] == ["c_empty"] and os.path.isfile(zdest)
    assert not os.path.exists(zdest + ".partial")
    with zipfile.ZipFile(zdest) as zf:
        names = set(zf.namelist())
        for rel, content in read_tree(dest_full).items():
            if rel != "conversion_report.json":
                assert zf.read(rel) == content, rel
    assert "conversion_report.json" in names and os.path.isfile(zdest + ".conversion_report.json")
    ds = data.open_dataset(zdest)
    assert ds.kind == "images" and len(ds) == 9
    np.testing.assert_array_equal(ds[0][0].permute(1, 2, 0).numpy(), _png(dest_full, 0))
    again = convert_dataset(zsrc, zdest, resolution=(32, 32), workers=1, progress=False)
    assert again["written"] == 0 and again["already_done"] == 9


def test_max_images_and_errors(tree, tmp_path):
    src, _ = tree
    summary = convert_dataset(src, str(tmp_path / "few"), resolution=(16, 16), max_images=2, workers=1, progress=False)
    assert summary["num_images"] == 2 and len(data.open_dataset(str(tmp_path / "few"))) == 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_dataset(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="outside --source"):
        convert_dataset(src, os.path.join(src, "out"), progress=False)
    os.makedirs(tmp_path / "flat")
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        convert_dataset(str(tmp_path / "flat"), str(tmp_path / "out"), progress=False)


def test_cli_convert(tree, converted, tmp_path, capsys):
    """The CLI in-process (the torchrun test in test_data_encode.py runs it as a script)."""
    import dataset_tools

    src, _ = tree
    dest = str(tmp_path / "cli")
    argv = ["convert", "--source", src, "--dest", dest, "--resolution", "32x32",
            "--transform", "center-crop-dhariwal", "--workers", "2", "--no-progress"]
    assert dataset_tools.main(argv) == 0
    out = capsys.readouterr().out
    assert "9 images written" in out and "skipped b_cls/corrupt.jpg" in out
    assert read_tree(dest) == read_tree(converted[0])

    assert dataset_tools.main(["convert", "--source", str(tmp_path / "missing"), "--dest", dest]) == 2
    assert "does not exist" in capsys.readouterr().err


def _class_tree(root, outside=None) -> dict:
    """cat (2 images), dog (1), bird (1) as 8x8 PNGs of distinct colours; {relative path: label}."""
    expected = {}
    for label, (name, count) in enumerate([("bird", 1), ("cat", 2), ("dog", 1)]):
        os.makedirs(os.path.join(root, name))
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * label, 20 * i, 90)).save(os.path.join(root, name, f"{name}{i}.png"))
            expected[f"{name}/{name}{i}.png"] = label
    return expected


class _Deadline:
    """Fail instead of hanging (the unfixed walk recursed through link cycles without end)."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def fail(signum, frame):
            raise TimeoutError(f"still walking after {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal

        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def _converted_labels(dest):
    with open(os.path.join(dest, "dataset.json")) as f:
        return sorted(lab for _, lab in json.load(f)["labels"])


@pytest.mark.parametrize("links", [
    {"cat/loop": ".."},                                  # one link back to the source: every class again under cat
    {"cat/loop": "..", "dog/loop": ".."},                # two: recursion without end
    {"cat/to_dog": "../dog", "dog/to_cat": "../cat"},    # a cycle between two classes
])
def test_folder_links_inside_the_source_are_not_followed(tmp_path, links):
    src = str(tmp_path / "train")
    expected = _class_tree(src)
    for link, target in links.items():
        os.symlink(target, os.path.join(src, link))
    dest = str(tmp_path / "images")
    with _Deadline(60):
        summary = convert_dataset(src, dest, resolution=(8, 8), workers=1, progress=False)
    assert summary["num_images"] == 4 and _converted_labels(dest) == sorted(expected.values())  # no duplicates
    with open(os.path.join(dest, "conversion_report.json")) as f:
        report = json.load(f)
    assert [entry["link"] for entry in report["skipped_links"]] == sorted(links)
    for entry in report["skipped_links"]:
        target = links[entry["link"]]
        where = "the source folder itself" if target == ".." else f"{target[3:]!r} inside the source"
        assert entry["reason"] == f"links to {where}, whose files are listed under their own path"
    assert f"{len(links)} folder links not followed" in convert_mod.format_summary(summary)


def test_a_folder_outside_the_source_is_followed_once(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside / "x.png")
    os.symlink(str(outside / "."), str(outside / "back"))  # a loop inside the linked folder too
    src = str(tmp_path / "train")
    expected = _class_tree(src)
    os.symlink(str(outside), os.path.join(src, "cat", "more"))
    os.symlink(str(outside), os.path.join(src, "dog", "same"))  # the same folder again
    dest = str(tmp_path / "images")
    with _Deadline(60):
        summary = convert_dataset(src, dest, resolution=(8, 8), workers=1, progress=False)
    assert summary["num_images"] == 5 and _converted_labels(dest) == sorted([*expected.values(), 1])
    assert summary["skipped_links"] == [("cat/more/back", f"links to {outside}, a folder already visited"),
                                        ("dog/same", f"links to {outside}, a folder already visited")]


def test_verify_names_a_listed_file_that_is_a_link_loop(tmp_path):
    """The readers open only the files dataset.json lists: a self-referencing link is one problem."""
    from data.verify import verify_dataset

    src = str(tmp_path / "train")
    _class_tree(src)
    dest = str(tmp_path / "images")
    convert_dataset(src, dest, resolution=(8, 8), workers=1, progress=False)
    victim = os.path.join(dest, "00000", "img00000001.png")
    os.remove(victim)
    os.symlink(victim, victim)
    with _Deadline(60):
        summary = verify_dataset(dest, workers=1, progress=False)
    [problem] = summary["problems"]
    assert problem["file"] == "00000/img00000001.png" and "Too many levels of symbolic links" in problem["reason"]
