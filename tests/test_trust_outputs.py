"""Outputs: every file and folder a run writes follows the umask (the team can read them), and
the output-side failures of generate.py and evaluation.ref_stats end in one line."""
import errno
import hashlib
import json
import os
import stat

import numpy as np
import pytest
import torch

import generate
from conftest import randomize_, read_tree, tiny_model
from evaluation import ref_stats as ref_stats_cli
from evaluation.inception import save_random_inception_weights
from generation import runner
from training.demo_data import write_demo_dataset
from training.loop import train

from train_helpers import tiny_config


def _save_pixel_checkpoint(path):
    """A pixel-space DFM-SiT-S/2 (8x8x3, 4 classes) as our training checkpoints store it."""
    model = randomize_(tiny_model("DFM-SiT-S/2", in_channels=3, num_classes=4))
    torch.save({"ema": model.state_dict(), "arch": model.arch, "steps": 0,
                "config": {"model": "DFM-SiT-S/2", "vae": "none", "path_type": "linear", "num_classes": 4}}, path)
    return str(path)


def _argv(ckpt, sample_dir, **kw):
    opts = dict(num_samples=6, per_proc_batch_size=4, num_steps_per_scale="[2,2]", run_name="run",
                sample_dir=str(sample_dir), **kw)
    return ["--ckpt", ckpt] + [f"{k}={v}" for k, v in opts.items()]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate.py: error: ") and "\n" not in err and "Traceback" not in err, err
    return err[len("generate.py: error: "):]


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    saved = os.umask(0o022)
    yield os.umask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_and_folder_of_a_run_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    data = write_demo_dataset(str(tmp_path / "data"), resolution=16, num_classes=2, images_per_class=4, seed=0)
    result = train(tiny_config(data, str(tmp_path / "out"), max_train_steps=2, save_format="safetensors",
                               **{"preview.num_samples": 2}))
    ckpt = _save_pixel_checkpoint(tmp_path / "pixel.pt")
    assert generate.main(_argv(ckpt, tmp_path / "samples")) == 0
    written = [os.path.join(root, name) for root, dirs, files in os.walk(tmp_path) for name in dirs + files]
    kinds = {os.path.splitext(p)[1] for p in written}
    assert {".pt", ".sha256", ".png", ".npz", ".yaml", ".safetensors", ".txt", ".json"} <= kinds, kinds
    assert os.path.isfile(result.last_checkpoint) and os.path.isfile(tmp_path / "samples" / "run.npz")
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in written if p != ckpt}  # the test's own torch.save
    expected = {p: (0o777 if os.path.isdir(p) else 0o666) & ~mask for p in modes}
    assert modes == expected


def test_generate_sample_dir_file_read_only_or_full_is_one_line(tmp_path, monkeypatch, capsys):
    ckpt = _save_pixel_checkpoint(tmp_path / "pixel.pt")
    not_a_dir = tmp_path / "samples.txt"
    not_a_dir.write_text("x")
    assert generate.main(_argv(ckpt, not_a_dir / "sub")) == 2
    assert _error(capsys) == (f"sample_dir {not_a_dir / 'sub'}: {not_a_dir} is a file, not a folder; choose another "
                              "sample_dir (the samples go to <sample_dir>/<run_name>/)")

    out = tmp_path / "out"
    keep = ("the complete PNGs written so far are kept and a rerun of the same command resumes from them (free "
            "space or fix the permissions first), or choose another sample_dir")
    # A read-only folder (simulated: as root chmod does not stop writes): the first write fails.
    real_save = runner.write_png_atomic

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr("pathlib.Path.mkdir", read_only)
    assert generate.main(_argv(ckpt, out)) == 2
    assert _error(capsys) == f"cannot write {out / 'run' / 'config.yaml'}: [Errno 13] Permission denied; {keep}"
    monkeypatch.undo()

    # The disk fills after 3 images: one line naming the 4th, the 3 kept; a rerun completes the set
    # exactly as an uninterrupted run makes it.
    done = []

    def full_after_three(path, image):
        if len(done) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done.append(path)
        real_save(path, image)

    monkeypatch.setattr(runner, "write_png_atomic", full_after_three)
    assert generate.main(_argv(ckpt, out)) == 2
    assert _error(capsys) == f"cannot write {out / 'run' / '000003.png'}: [Errno 28] No space left on device; {keep}"
    assert sorted(p.name for p in (out / "run").glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert not (out / "run.npz").exists()
    monkeypatch.undo()

    def read_only_npz(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(runner, "write_npz_from_pngs", read_only_npz)
    assert generate.main(_argv(ckpt, out)) == 2
    assert _error(capsys) == f"cannot write {out / 'run.npz'}: [Errno 30] Read-only file system; {keep}"
    monkeypatch.undo()

    assert generate.main(_argv(ckpt, out)) == 0
    assert generate.main(_argv(ckpt, tmp_path / "uninterrupted")) == 0
    resumed, whole = read_tree(out), read_tree(tmp_path / "uninterrupted")
    assert resumed.pop("run/config.yaml") != whole.pop("run/config.yaml")  # it names its sample_dir
    records = [json.loads(tree.pop("run.provenance.json")) for tree in (resumed, whole)]  # paths and dates differ
    assert all(r["complete"] and r["npz_sha256"] == hashlib.sha256(resumed["run.npz"]).hexdigest() for r in records)
    assert sorted(resumed) == ["run.npz"] + [f"run/{i:06d}.png" for i in range(6)] and resumed == whole


@pytest.fixture(scope="module")
def images_with_a_corrupt_png(tmp_path_factory):
    folder = write_demo_dataset(str(tmp_path_factory.mktemp("data") / "shapes"), resolution=16, num_classes=2,
                                images_per_class=3, seed=0)
    bad = os.path.join(folder, "00000", "img00000001.png")  # in the first batch: no network runs before it
    with open(bad, "r+b") as f:
        f.truncate(60)  # header intact, pixel data cut
    return folder, bad


@pytest.mark.parametrize("inception", [True, False])
def test_ref_stats_names_a_corrupt_png(images_with_a_corrupt_png, tmp_path, capsys, inception):
    """Through the DataLoader workers (Inception features) and through the SWD image subset."""
    folder, bad = images_with_a_corrupt_png
    out = tmp_path / "stats.npz"
    args = [folder, "--out", str(out), "--no-dinov2", "--swd-images", "all", "--workers", "1", "--device", "cpu",
            "--no-progress", "--batch-size", "2"]
    if inception:
        args += ["--inception-weights", save_random_inception_weights(str(tmp_path / "inception.pth"))]
    else:
        args += ["--no-inception"]
    assert ref_stats_cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: corrupt sample 1: {bad}: cannot decode the image (") and "\n" not in err, err
    assert err.endswith(f"reference statistics need every image: fix or remove it (`python dataset_tools.py "
                        f"verify {folder}` lists all corrupt files)")
    assert not out.exists()


def test_ref_stats_and_evaluate_out_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)  # SWD needs 16 px
    np.savez(tmp_path / "ref.npz", arr_0=images)
    out = tmp_path / "stats.npz"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ref_stats_cli, "save_statistics", full)
    assert ref_stats_cli.main([str(tmp_path / "ref.npz"), "--out", str(out), "--no-inception", "--no-dinov2",
                               "--swd-images", "2", "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write {out}: [Errno 28] No space left on device"
