"""dataset_tools.py convert / encode / verify and the dataset readers on hostile input and full or
read-only disks ("Trust, third pass"): one line, the documented exit status, nothing half-written
under a final name, nothing lost, and a rerun that resumes."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

import data
import data.convert as convert_mod
import dataset_tools
from conftest import read_tree
from data.convert import convert_dataset
from data.robust import CorruptSampleError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_SPACE = "[Errno 28] No space left on device; the complete files written so far are kept: free some space and " \
           "rerun the same command to resume"
READ_ONLY = "[Errno 30] Read-only file system; choose a --dest you can write to"


def _noise_tree(root, per_class=6, size=64) -> str:
    """Classes a and b of random-noise PNGs (they do not compress: one converted PNG fills 4 pages)."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(root, name, f"{i}.png"))
    return str(root)


def _main(capsys, *argv):
    """dataset_tools.main in-process: (exit status, stdout, stderr)."""
    code = dataset_tools.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.rstrip("\n")


def _temporaries(folder) -> list:
    return [os.path.join(r, n) for r, ds, fs in os.walk(folder) for n in ds + fs if n.startswith(".tmp-")]


def _remount(folder, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


# ---------------------------------------------------------------- 4, 11: convert on a full or read-only disk

def test_convert_stops_on_a_full_disk_and_the_rerun_finishes(tmp_path, small_tmpfs, capsys):
    src = _noise_tree(tmp_path / "src")
    reference = str(tmp_path / "reference")
    convert_dataset(src, reference, resolution=(64, 64), workers=1, progress=False)
    disk = small_tmpfs(64 * 1024)  # room for 3 of the 12 PNGs
    dest = str(disk / "images")
    code, out, err = _main(capsys, "convert", "--source", src, "--dest", dest, "--resolution", "64x64",
                           "--workers", "2", "--no-progress")
    line = _one_line(err)
    assert code == 1 and out == ""
    assert re.fullmatch(rf"dataset_tools\.py convert: error: cannot write {re.escape(dest)}/00000/img000000\d\d\.png: "
                        + re.escape(NO_SPACE), line), line
    # not "complete", no dataset.json; every PNG under its final name is whole; no temporary file
    assert json.load(open(os.path.join(dest, "conversion_report.json")))["status"] == "incomplete"
    assert not os.path.exists(os.path.join(dest, "dataset.json"))
    written = read_tree(dest)
    expected = read_tree(reference)
    # (a temporary file of the other worker may remain: the rerun removes it, see below)
    pngs = [rel for rel in written if rel.endswith(".png") and not os.path.basename(rel).startswith(".tmp-")]
    assert 0 < len(pngs) < 12 and all(written[rel] == expected[rel] for rel in pngs)

    _remount(disk, "size=1m")
    code, out, err = _main(capsys, "convert", "--source", src, "--dest", dest, "--resolution", "64x64",
                           "--workers", "2", "--no-progress")
    assert code == 0 and err == "" and f"{12 - len(pngs)} images written, {len(pngs)} already present" in out
    assert read_tree(dest) == expected


def test_convert_to_a_zip_on_a_full_disk(tmp_path, small_tmpfs, capsys):
    src = _noise_tree(tmp_path / "src")
    reference = str(tmp_path / "reference.zip")
    convert_dataset(src, reference, resolution=(64, 64), workers=1, progress=False)
    disk = small_tmpfs(256 * 1024)  # the PNGs fit, the archive of them does not
    dest = str(disk / "images.zip")
    code, out, err = _main(capsys, "convert", "--source", src, "--dest", dest, "--resolution", "64x64",
                           "--no-progress")
    assert code == 1 and _one_line(err) == f"dataset_tools.py convert: error: cannot write {dest}: {NO_SPACE}"
    assert sorted(os.listdir(disk)) == ["images.zip.partial"] and _temporaries(disk) == []

    _remount(disk, "size=1m")
    code, out, err = _main(capsys, "convert", "--source", src, "--dest", dest, "--resolution", "64x64",
                           "--no-progress")
    assert code == 0 and err == "" and "12 already present" in out
    assert sorted(os.listdir(disk)) == ["images.zip", "images.zip.conversion_report.json"]
    assert open(dest, "rb").read() == open(reference, "rb").read()


@pytest.mark.parametrize("name, made", [("images", "images"), ("images.zip", "images.zip.partial")])
def test_convert_to_a_read_only_disk(tmp_path, small_tmpfs, capsys, name, made):
    src = _noise_tree(tmp_path / "src", per_class=1, size=8)
    disk = small_tmpfs(1 << 20)
    _remount(disk, "ro")
    code, out, err = _main(capsys, "convert", "--source", src, "--dest", disk / name, "--no-progress")
    assert code == 2 and out == ""
    assert _one_line(err) == f"dataset_tools.py convert: error: cannot write {disk / made}: {READ_ONLY}"
    assert os.listdir(disk) == []


def test_verify_a_dataset_on_a_read_only_disk(tmp_path, small_tmpfs, capsys):
    """verify writes nothing into the dataset (it may be read-only or shared); the report goes where asked."""
    src = _noise_tree(tmp_path / "src", per_class=2, size=8)
    disk = small_tmpfs(1 << 20)
    convert_dataset(src, str(disk / "images"), resolution=(8, 8), workers=1, progress=False)
    convert_dataset(src, str(disk / "images.zip"), resolution=(8, 8), workers=1, progress=False)
    with open(disk / "images" / "00000" / "img00000002.png", "r+b") as f:
        f.truncate(40)
    _remount(disk, "ro")
    before = read_tree(disk)
    code, out, err = _main(capsys, "verify", disk / "images", "--workers", "1", "--no-progress")
    assert code == 1 and err == "" and "1 problem(s)" in out and "00000/img00000002.png: " in out
    code, out, err = _main(capsys, "verify", disk / "images.zip", "--workers", "1", "--no-progress")
    assert code == 0 and err == "" and "0 problem(s)" in out
    report = tmp_path / "report.json"
    assert _main(capsys, "verify", disk / "images", "--no-progress", "--report", report)[0] == 1
    assert json.loads(report.read_text())["problems"][0]["file"] == "00000/img00000002.png"
    code, out, err = _main(capsys, "verify", disk / "images", "--no-progress", "--report", disk / "r.json")
    assert code == 2 and _one_line(err) == (f"dataset_tools.py verify: error: cannot write {disk / 'r.json'}: "
                                            "[Errno 30] Read-only file system; choose a --report you can write to")
    assert read_tree(disk) == before


# ---------------------------------------------------------------- 4, 11, 20: encode

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """5 images of 64x64 (latents (8, 8, 8): 2 KiB, one page each) in the SPEC section 7 layout."""
    root = str(tmp_path_factory.mktemp("img") / "images")
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "00000"))
    labels = []
    for idx in range(5):
        rel = f"00000/img{idx:08d}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(os.path.join(root, rel))
        labels.append([rel, idx % 2])
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"labels": labels, "classes": ["x", "y"]}, f)
    return root


@pytest.fixture
def torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _encode(capsys, images, dest, vae, *extra):
    return _main(capsys, "encode", "--source", images, "--dest", dest, "--vae", vae, "--batch-size", "2",
                 "--device", "cpu", "--no-progress", *extra)


def test_encode_per_image_stops_on_a_full_disk_and_the_rerun_finishes(images, vae_dir, small_tmpfs, capsys,
                                                                      torch_one_thread):
    disk = small_tmpfs(12 * 1024)  # encode_settings.json and two latents
    dest = str(disk / "latents")
    code, out, err = _encode(capsys, images, dest, vae_dir)
    line = _one_line(err)
    assert code == 1 and out == ""
    assert re.fullmatch(rf"dataset_tools\.py encode: error: cannot write {re.escape(dest)}/00000/"
                        rf"img-mean-std-0000000\d\.npy: " + re.escape(NO_SPACE), line), line
    latents = [n for n in os.listdir(os.path.join(dest, "00000"))]
    assert 0 < len(latents) < 5 and _temporaries(dest) == []
    for name in latents:  # whole files under the final names
        assert np.load(os.path.join(dest, "00000", name)).shape == (8, 8, 8)
    assert not os.path.exists(os.path.join(dest, "dataset.json"))

    _remount(disk, "size=1m")
    code, out, err = _encode(capsys, images, dest, vae_dir)
    assert code == 0 and err == "" and "already present" in out
    assert len(data.open_dataset(dest)) == 5


def test_encode_packed_on_a_full_disk_is_one_line_not_sigbus(images, vae_dir, small_tmpfs):
    """A memory-mapped shard on a full tmpfs died with SIGBUS (no message): run it as a real process."""
    disk = small_tmpfs(12 * 1024)  # encode_settings.json, then two pages: the shard needs 3 (10368 bytes)
    dest = str(disk / "packed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "dataset_tools.py"), "encode", "--source", images,
                           "--dest", dest, "--vae", vae_dir, "--format", "packed", "--shard-size", "5",
                           "--device", "cpu", "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert _one_line(proc.stderr) == f"dataset_tools.py encode: error: cannot write {dest}/shard-00000.npy: {NO_SPACE}"
    assert sorted(os.listdir(dest)) == ["encode_settings.json"]


def test_encode_to_a_read_only_disk(images, vae_dir, small_tmpfs, capsys, torch_one_thread):
    disk = small_tmpfs(1 << 20)
    _remount(disk, "ro")
    code, out, err = _encode(capsys, images, disk / "latents", vae_dir)
    assert code == 2 and out == ""
    assert _one_line(err) == f"dataset_tools.py encode: error: cannot write {disk / 'latents'}: {READ_ONLY}"
    assert os.listdir(disk) == []


def test_a_vae_that_does_not_load_leaves_nothing_that_refuses_the_retry(images, vae_dir, tmp_path, capsys,
                                                                        torch_one_thread):
    broken = tmp_path / "broken-vae"
    broken.mkdir()
    (broken / "config.json").write_text("this is not a config")
    dest = str(tmp_path / "latents")
    code, out, err = _encode(capsys, images, dest, broken)
    assert code == 2 and _one_line(err).startswith(
        f"dataset_tools.py encode: error: could not load the VAE from folder {str(broken)!r}")
    assert not os.path.exists(dest)  # no encode_settings.json naming the broken VAE
    code, out, err = _encode(capsys, images, dest, vae_dir)
    assert code == 0 and err == "" and "5 images encoded" in out


# ---------------------------------------------------------------- 5: the destination inside the source via a link

def _class_tree(root):
    for label, (name, count) in enumerate([("bird", 1), ("cat", 2), ("dog", 1)]):
        os.makedirs(os.path.join(root, name))
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * label, 20 * i, 90)).save(os.path.join(root, name, f"{name}{i}.png"))
    return str(root)


def test_dest_inside_the_source_through_a_link_is_refused(tmp_path):
    src = _class_tree(tmp_path / "train")
    os.symlink(src, tmp_path / "train-link")
    dest = str(tmp_path / "train-link" / "out2")
    with pytest.raises(ValueError) as info:
        convert_dataset(src, dest, resolution=(8, 8), workers=1, progress=False)
    assert str(info.value) == (f"--dest {dest!r} must lie outside --source {src!r} (and not contain it), also through "
                               f"links: {dest!r} resolves to {os.path.join(src, 'out2')!r}, the source to {src!r}")
    assert sorted(os.listdir(src)) == ["bird", "cat", "dog"]


def test_links_from_the_source_to_the_destination_are_never_walked(tmp_path):
    src = _class_tree(tmp_path / "train")
    dest = str(tmp_path / "images")
    os.symlink(dest, os.path.join(src, "out3"))  # would become a class
    os.symlink(dest, os.path.join(src, "cat", "out"))  # would add the output to class cat
    first = convert_dataset(src, dest, resolution=(8, 8), workers=1, progress=False)
    again = convert_dataset(src, dest, resolution=(8, 8), workers=1, progress=False)
    assert first["num_images"] == again["num_images"] == again["already_done"] == 4 and again["num_classes"] == 3
    reason = f"links to {dest}, the destination of this conversion, which is never read as a source"
    assert again["skipped_links"] == [("cat/out", reason), ("out3", reason)]
    assert json.load(open(os.path.join(dest, "dataset.json")))["classes"] == ["bird", "cat", "dog"]


# ---------------------------------------------------------------- 6: a resolution whose buffers do not fit

def test_a_resolution_that_does_not_fit_in_memory_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    src = _class_tree(tmp_path / "train")
    monkeypatch.setattr(convert_mod, "_available_memory", lambda: 16 * 2**30, raising=False)

    def no_work(*args):
        raise AssertionError("an image was converted")

    monkeypatch.setattr(convert_mod, "convert_one", no_work)
    dest = tmp_path / "out"
    code, out, err = _main(capsys, "convert", "--source", src, "--dest", dest, "--resolution", "100000x100000",
                           "--workers", "1", "--no-progress")
    assert code == 2 and _one_line(err) == (
        "dataset_tools.py convert: error: --resolution 100000x100000 needs about 149.0 GiB of image buffers per "
        "worker process (16 bytes per output pixel), more than half of the 16.0 GiB of memory available; choose a "
        "smaller --resolution")
    monkeypatch.setattr(convert_mod, "_available_memory", lambda: 8 * 2**30)
    code, out, err = _main(capsys, "convert", "--source", src, "--dest", dest, "--resolution", "8192x8192",
                           "--workers", "6", "--no-progress")
    assert code == 2 and _one_line(err) == (
        "dataset_tools.py convert: error: --resolution 8192x8192 needs about 1.0 GiB of image buffers per worker "
        "process (16 bytes per output pixel), 6.0 GiB for --workers 6, more than half of the 8.0 GiB of memory "
        "available; use --workers 4 or fewer, or a smaller --resolution")
    assert not os.path.exists(dest)


def test_the_default_worker_count_is_lowered_to_what_fits(tmp_path, monkeypatch):
    src = _class_tree(tmp_path / "train")
    monkeypatch.setattr(convert_mod, "_available_memory", lambda: 2 * 16 * 8 * 8, raising=False)  # one worker
    monkeypatch.setattr(convert_mod, "_cpu_count", lambda: 4)
    summary = convert_dataset(src, str(tmp_path / "out"), resolution=(8, 8), progress=False)
    assert summary["workers"] == 1 and summary["num_images"] == 4


# ---------------------------------------------------------------- 7: a decompression bomb in a zip source

def test_zip_members_too_large_for_an_image_are_skipped_undecompressed(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3_000_000)  # images up to 24 MB raw; PIL's default: 716 MB
    zsrc = str(tmp_path / "train.zip")
    with zipfile.ZipFile(zsrc, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        buf = tmp_path / "good.png"
        Image.new("RGB", (8, 8), (1, 2, 3)).save(buf)
        zf.write(buf, "cls/good.png")
        zf.writestr("cls/huge.png", bytes(32 * 2**20))  # declares 32 MiB
        zf.writestr("cls/flat.bmp", bytes(17 * 2**20))  # within the size limit, but expands ~1000:1
        flat = zf.getinfo("cls/flat.bmp")
    summary = convert_dataset(zsrc, str(tmp_path / "out"), resolution=(8, 8), workers=1, progress=False)
    assert summary["num_images"] == 1
    assert dict(summary["skipped"]) == {
        "cls/huge.png": "DecompressionBombError: the ZIP member declares 33554432 bytes uncompressed, more than any "
                        "image within PIL's pixel limit can hold (24000000 bytes = 2 x 3000000 pixels x 4 bytes); "
                        "not decompressed",
        "cls/flat.bmp": f"DecompressionBombError: the ZIP member expands {flat.file_size // flat.compress_size}:1 "
                        f"({flat.compress_size} -> {flat.file_size} bytes), more than 100:1, which no image file "
                        "does; not decompressed",
    }


# ---------------------------------------------------------------- 9a, 9b: kill -9

_CONVERT_DRIVER = r"""
import os, sys, time
sys.path.insert(0, {repo!r})
import data.convert as convert
real = convert.apply_transform
def slow(*args):
    open(os.path.join({marks!r}, str(os.getpid())), "w").close()
    time.sleep(10)  # a large image: the worker is busy when its parent is killed
    return real(*args)
convert.apply_transform = slow
convert.convert_dataset({src!r}, {dest!r}, resolution=(8, 8), workers=2, progress=False)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie writes nothing
    except FileNotFoundError:
        return False


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {seconds} s")
        time.sleep(0.1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_convert_workers_die_with_a_killed_parent(tmp_path):
    src = str(tmp_path / "train")
    os.makedirs(os.path.join(src, "cls"))
    for i in range(200):  # 6 images a chunk: an orphaned worker would go on for a minute
        Image.new("RGB", (8, 8), (i, 0, 0)).save(os.path.join(src, "cls", f"{i:03d}.png"))
    marks = tmp_path / "marks"
    marks.mkdir()
    driver = _CONVERT_DRIVER.format(repo=REPO, marks=str(marks), src=src, dest=str(tmp_path / "out"))
    proc = subprocess.Popen([sys.executable, "-c", driver])
    workers = []
    try:
        _wait_for(lambda: len(os.listdir(marks)) == 2 or proc.poll() is not None, 120, "no two busy workers")
        workers = [int(name) for name in os.listdir(marks)]
        assert proc.poll() is None and all(_alive(pid) for pid in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not any(_alive(pid) for pid in workers), 30, "a worker still runs")
    finally:
        proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


_DEMO_DRIVER = r"""
import sys
sys.path.insert(0, {repo!r})
from training.demo_data import write_demo_dataset
write_demo_dataset({path!r}, resolution=16, num_classes=2, images_per_class=100000)
"""


def test_demo_data_cleans_the_temporary_folder_of_a_killed_writer(tmp_path):
    from training.demo_data import write_demo_dataset

    path = str(tmp_path / "shapes")
    foreign = tmp_path / ".tmp-0123abcd-other"  # another dataset's: not ours to remove
    foreign.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _DEMO_DRIVER.format(repo=REPO, path=path)])
    try:
        def started():  # the temporary folder holds files
            tmp = [n for n in os.listdir(tmp_path) if n.endswith("-shapes")]
            return proc.poll() is not None or (bool(tmp) and bool(os.listdir(tmp_path / tmp[0])))

        _wait_for(started, 120, "the demo writer did not start")
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    [stale] = [n for n in os.listdir(tmp_path) if n.endswith("-shapes")]
    assert re.fullmatch(r"\.tmp-[0-9a-f]{8}-shapes", stale)

    write_demo_dataset(path, resolution=16, num_classes=2, images_per_class=3)
    assert sorted(os.listdir(tmp_path)) == [".tmp-0123abcd-other", "shapes"]
    assert len(data.open_dataset(path)) == 6


# ---------------------------------------------------------------- 12: a truncated or damaged zip dataset

@pytest.fixture
def images_zip(tmp_path):
    src = _class_tree(tmp_path / "train")
    dest = str(tmp_path / "images.zip")
    convert_dataset(src, dest, resolution=(8, 8), workers=1, progress=False)
    return dest


def test_a_truncated_zip_is_one_line_naming_it(images_zip, tmp_path, capsys):
    raw = open(images_zip, "rb").read()
    bad = str(tmp_path / "truncated.zip")
    open(bad, "wb").write(raw[: len(raw) // 2])
    message = (f"{bad!r} is not a readable ZIP archive (File is not a zip file); is it truncated or damaged? "
               "Copy or write it again")
    with pytest.raises(ValueError) as info:
        data.open_dataset(bad)  # what train.py's data_dir opens (training/setup.py: ValueError -> ConfigError)
    assert str(info.value) == message
    from training.config import ConfigError, parse_config
    from training.setup import open_training_dataset

    with pytest.raises(ConfigError) as info:  # train.py prints it as one line, exit 2
        open_training_dataset(parse_config([f"data_dir={bad}", "vae=none", "resolution=8"]))
    assert str(info.value).endswith(message) and "\n" not in str(info.value)
    code, out, err = _main(capsys, "verify", bad, "--no-progress")
    assert code == 2 and _one_line(err) == f"dataset_tools.py verify: error: {message}"
    code, out, err = _main(capsys, "convert", "--source", bad, "--dest", tmp_path / "out", "--no-progress")
    assert code == 2 and _one_line(err) == f"dataset_tools.py convert: error: {message}"
    assert not os.path.exists(tmp_path / "out")


def test_a_damaged_zip_member_is_a_corrupt_sample(images_zip):
    with zipfile.ZipFile(images_zip) as zf:
        info = zf.getinfo("00000/img00000001.png")
    raw = bytearray(open(images_zip, "rb").read())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # the stored bytes
    raw[start + 20] ^= 0xFF
    open(images_zip, "wb").write(bytes(raw))
    ds = data.open_dataset(images_zip)
    with pytest.raises(CorruptSampleError) as error:
        ds[1]
    assert str(error.value) == (f"corrupt sample 1: {images_zip}/00000/img00000001.png: cannot read the file: "
                                f"damaged member '00000/img00000001.png' of the ZIP archive {images_zip!r}: "
                                "Bad CRC-32 for file '00000/img00000001.png'")
    assert ds[0][0].shape == (3, 8, 8)


# ---------------------------------------------------------------- 13: dataset.json that is not what convert writes

GOOD = "00000/img00000000.png"


@pytest.mark.parametrize("content, problem", [
    ('{"labels": 5}', '"labels" must be a list of [path, label] pairs, got int 5'),
    ('{"labels": [["%s", 0]], "classes": 7}' % GOOD, '"classes" must be a list of class names, got int 7'),
    ('{"labels": [["%s", "zero"]]}' % GOOD, f"labels entry 0 ({GOOD!r}) has label \"zero\", not an integer"),
    ('{"labels": [["%s", 1.5]]}' % GOOD, f"labels entry 0 ({GOOD!r}) has label 1.5, not an integer"),
    ('{"labels": [["%s"]]}' % GOOD, f'labels entry 0 must be a [path, label] pair, got ["{GOOD}"]'),
    ('{"labels": [["%s", 0], ["../../etc/passwd", 0]]}' % GOOD,
     "labels entry 1 names '../../etc/passwd', which leaves the dataset (absolute or with '..'); refused, "
     "nothing read"),
    ('{"labels": [["/etc/passwd", 0]]}',
     "labels entry 0 names '/etc/passwd', which leaves the dataset (absolute or with '..'); refused, nothing read"),
])
def test_a_malformed_dataset_json_is_refused_naming_it(tmp_path, capsys, content, problem):
    root = tmp_path / "images"
    (root / "00000").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / GOOD)
    (root / "dataset.json").write_text(content)
    where = repr(str(root / "dataset.json"))
    with pytest.raises(ValueError) as info:
        data.open_dataset(str(root))
    assert str(info.value) == f"{where}: {problem}"
    code, out, err = _main(capsys, "verify", root, "--no-progress")
    assert code == 2 and _one_line(err) == f"dataset_tools.py verify: error: {where}: {problem}"


def test_a_broken_dataset_json_is_named(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "dataset.json").write_text('{"labels": [')
    with pytest.raises(ValueError) as info:
        data.open_dataset(str(root))
    assert str(info.value) == (f"{str(root / 'dataset.json')!r} is not valid JSON (Expecting value: line 1 column 13 "
                               "(char 12)); the file is damaged: write the dataset again")


# ---------------------------------------------------------------- 20: one report line per file

def test_a_file_name_with_a_newline_stays_on_one_report_line(tmp_path, capsys):
    src = _class_tree(tmp_path / "train")
    with open(os.path.join(src, "cat", "bad\nname.jpg"), "wb") as f:
        f.write(b"not an image")
    code, out, err = _main(capsys, "convert", "--source", src, "--dest", tmp_path / "out", "--resolution", "8",
                           "--workers", "1", "--no-progress")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert all(line.startswith(("convert:", "  ")) for line in lines), lines
    assert "  skipped 'cat/bad\\nname.jpg': not a readable image: PIL cannot identify the file format" in lines
