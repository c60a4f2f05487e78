"""Trust, third pass: evaluation inputs and outputs end in one line naming the file.

Items of the issue: 11 (budget_sweep --out read-only / full), 12 (a damaged ZIP given to ref_stats),
14 (a statistics file with a garbled meta_json, an object array, a sigma that is no covariance),
17c (non-finite statistics during training skip that evaluation), 20 (compare on a binary file;
the Fréchet distance of a set with itself is 0, never -1e-13).
"""
import json
import os
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from conftest import Payload, randomize_, tiny_model
from evaluation import compare
from evaluation import evaluate as evaluate_cli
from evaluation import npz
from evaluation import ref_stats as ref_stats_cli
from evaluation.metrics import feature_statistics, frechet_distance
from evaluation.stats_file import ReferenceStatistics, load_statistics, save_statistics, weights_identity
from training.demo_data import write_demo_dataset

from train_helpers import tiny_config

RECREATE = "recreate it with python -m evaluation.ref_stats"


def _one_line(capsys, prefix="error: ") -> str:
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ---------------------------------------------------------------------------------------- 11
def _elit_checkpoint(path):
    model = randomize_(tiny_model("ELIT-SiT-S/2", depth=4, input_size=16, encoder_depth=1, elit_tail_depth=1,
                                  group_size=2, elit_max_mask_prob=0.75, in_channels=3, num_classes=4)).eval()
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "arch": model.arch,
                "config": {"model": model.arch["name"], "vae": "none", "path_type": "linear"}}, path)
    return str(path)


def test_budget_sweep_out_full_or_read_only_is_one_line_and_writes_nothing(tmp_path, small_tmpfs, capsys):
    from generation import budget_sweep

    ckpt = _elit_checkpoint(tmp_path / "elit.pt")
    argv = ["--ckpt", ckpt, "--class-label", "1", "--num-seeds", "1", "--steps", "1", "--budgets", "1",
            "--precision", "fp32"]
    assert budget_sweep.main(argv + ["--out", str(tmp_path / "fits")]) == 0
    capsys.readouterr()
    grid_bytes = os.path.getsize(tmp_path / "fits" / "grid.png")
    assert os.path.getsize(tmp_path / "fits" / "flops.png") > 8192
    pages = -(-grid_bytes // 4096)
    # Room for grid.png and an earlier budget_sweep.json (plus a page to spare), not for flops.png.
    disk = small_tmpfs((pages + 2) * 4096)
    (disk / "budget_sweep.json").write_text('{"earlier": true}')
    nothing = "; nothing was written (free space or fix the permissions, or choose another --out)"
    assert budget_sweep.main(argv + ["--out", str(disk)]) == 2
    assert _one_line(capsys, "budget_sweep: error: ") == (
        f"budget_sweep: error: cannot write {disk / 'flops.png'}: [Errno 28] No space left on device{nothing}")
    assert os.listdir(disk) == ["budget_sweep.json"]  # no grid.png alone, no temporary file, nothing lost
    assert (disk / "budget_sweep.json").read_text() == '{"earlier": true}'

    remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if remount.returncode:
        pytest.skip(f"cannot remount the tmpfs read-only: {remount.stderr.strip()[:120]}")
    assert budget_sweep.main(argv + ["--out", str(disk / "sweep")]) == 2
    assert _one_line(capsys, "budget_sweep: error: ") == (
        f"budget_sweep: error: cannot write {disk / 'sweep' / 'grid.png'}: [Errno 30] Read-only file system{nothing}")
    assert os.listdir(disk) == ["budget_sweep.json"]


# ---------------------------------------------------------------------------------------- 12
@pytest.fixture(scope="module")
def zipped_dataset(tmp_path_factory):
    from data.storage import zip_folder

    tmp = tmp_path_factory.mktemp("zips")
    folder = write_demo_dataset(str(tmp / "shapes"), resolution=16, num_classes=2, images_per_class=3, seed=0)
    good = str(tmp / "good.zip")
    zip_folder(folder, good)
    return good


def _ref_stats(source, out, workers=0):
    return ref_stats_cli.main([source, "--out", str(out), "--no-inception", "--no-dinov2", "--swd-images", "all",
                               "--workers", str(workers), "--device", "cpu", "--no-progress"])


def test_ref_stats_of_a_truncated_or_damaged_zip_is_one_line_naming_it(zipped_dataset, tmp_path, capsys):
    data = open(zipped_dataset, "rb").read()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[:len(data) // 2])  # the central directory is gone
    with zipfile.ZipFile(zipped_dataset) as zf:
        member = [i for i in zf.infolist() if i.filename.endswith(".png")][1]
    damaged = bytearray(data)
    start = member.header_offset + 30 + len(member.filename) + 20  # inside the PNG's bytes: a bad CRC
    damaged[start:start + 4] = bytes(b ^ 0xFF for b in damaged[start:start + 4])
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    out = tmp_path / "stats.npz"
    for source, workers in ((truncated, 0), (tmp_path / "damaged.zip", 0), (tmp_path / "damaged.zip", 1)):
        assert _ref_stats(str(source), out, workers) == 2
        assert str(source) in _one_line(capsys)
        assert sorted(os.listdir(tmp_path)) == ["damaged.zip", "truncated.zip"]  # no stats.npz, no temporary


def test_ref_stats_turns_any_reader_error_into_one_line(zipped_dataset, tmp_path, monkeypatch, capsys):
    """zipfile's own error (a reader that does not translate it) is named like the readers' ValueError."""
    def bad_zip(path, kind=None):
        raise zipfile.BadZipFile("File is not a zip file")

    monkeypatch.setattr(ref_stats_cli, "open_dataset", bad_zip)
    assert _ref_stats(zipped_dataset, tmp_path / "stats.npz") == 2
    assert _one_line(capsys) == f"error: {zipped_dataset}: File is not a zip file; or pass an ADM .npz with arr_0"
    assert not (tmp_path / "stats.npz").exists()


# ---------------------------------------------------------------------------------------- 14
META = {"format": "dfm-reference-statistics", "version": 1, "source": "x", "num_images": 5, "resolution": [8, 8],
        "inception": None, "dinov2": None, "swd": None}


def _stats_file(path, meta_json=None, **arrays):
    """An .npz as np.savez writes it (object arrays pickled), with the given meta_json."""
    arrays = {"mu_dinov2": np.zeros(4), "sigma_dinov2": np.diag([1.0, 2.0, 3.0, 4.0]), **arrays}
    np.savez(path, meta_json=np.array(json.dumps(META)) if meta_json is None else meta_json, **arrays)
    return str(path)


def _bad_meta(key, value):
    return np.array(json.dumps({**META, key: value}))


@pytest.mark.parametrize("case, expected", [
    ("not_json", "meta_json: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                 f"(char 1)); {RECREATE}"),
    ("json_list", f"meta_json holds a JSON list, expected an object; {RECREATE}"),
    ("number", f"meta_json is a int64 array of shape (), expected a string holding a JSON object; {RECREATE}"),
    ("resolution", f'meta_json field resolution is "8x8", expected [height, width] (positive integers); {RECREATE}'),
    ("num_images", f"meta_json field num_images is 5.5, expected an integer >= 0; {RECREATE}"),
    ("inception", 'meta_json field inception is "weights.pth", expected null or {"file": str, "sha256": str, '
                  f'"bytes": int}}; {RECREATE}'),
    ("swd", 'meta_json field swd is {"num_images": "3", "seed": 0}, expected null or {"num_images": int, '
            f'"seed": int}}; {RECREATE}'),
    ("object_array", "sigma_dinov2 is an object array (pickled Python objects), which is never loaded: statistics "
                     "files hold plain arrays only"),
    ("string_mu", "mu_dinov2 has dtype <U1, expected real numbers (float64)"),
    ("negated_sigma", "sigma_dinov2 is not a covariance matrix: it has a negative eigenvalue (-4; a covariance has "
                      "none below -1e-06 x its trace); recompute the statistics"),
    ("asymmetric_sigma", "sigma_dinov2 is not a covariance matrix: it is not symmetric (|sigma_dinov2 - "
                         "sigma_dinov2^T| up to 0.5); recompute the statistics"),
])
def test_a_malformed_statistics_file_is_one_line_naming_it(tmp_path, capsys, case, expected):
    marker = tmp_path / "unpickled"
    path = tmp_path / "stats.npz"
    asymmetric = np.diag([1.0, 2.0, 3.0, 4.0])
    asymmetric[0, 1] = 0.5
    make = {
        "not_json": lambda: _stats_file(path, np.array("{not json")),
        "json_list": lambda: _stats_file(path, np.array("[1, 2]")),
        "number": lambda: _stats_file(path, np.array(5)),
        "resolution": lambda: _stats_file(path, _bad_meta("resolution", "8x8")),
        "num_images": lambda: _stats_file(path, _bad_meta("num_images", 5.5)),
        "inception": lambda: _stats_file(path, _bad_meta("inception", "weights.pth")),
        "swd": lambda: _stats_file(path, _bad_meta("swd", {"num_images": "3", "seed": 0})),
        "object_array": lambda: _stats_file(path, sigma_dinov2=np.array([Payload(marker)], dtype=object)),
        "string_mu": lambda: _stats_file(path, mu_dinov2=np.array(list("abcd"))),
        "negated_sigma": lambda: _stats_file(path, sigma_dinov2=-np.diag([1.0, 2.0, 3.0, 4.0])),
        "asymmetric_sigma": lambda: _stats_file(path, sigma_dinov2=asymmetric),
    }
    make[case]()
    with pytest.raises(npz.InputError) as error:
        load_statistics(str(path))
    assert str(error.value) == f"reference statistics {path}: {expected}"
    np.savez(tmp_path / "smp.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    out = tmp_path / "results.json"
    assert evaluate_cli.main([str(path), str(tmp_path / "smp.npz"), "--inception-weights", str(tmp_path / "no.pth"),
                              "--out", str(out), "--no-progress"]) == 2
    assert _one_line(capsys) == f"error: reference statistics {path}: {expected}"
    assert not marker.exists() and not out.exists()


def test_stored_statistics_of_a_reference_batch_are_checked_the_same_way(tmp_path, monkeypatch):
    monkeypatch.setattr(npz, "POOL_DIM", 3)
    monkeypatch.setattr(npz, "SPATIAL_DIM", 2)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    good = dict(mu=np.zeros(3), sigma=np.eye(3), mu_s=np.zeros(2), sigma_s=np.eye(2))
    np.savez(tmp_path / "good.npz", arr_0=images, **good)
    assert npz.read_reference_statistics(str(tmp_path / "good.npz"))["sigma_s"].dtype == np.float64
    np.savez(tmp_path / "neg.npz", arr_0=images, **{**good, "sigma_s": -np.eye(2)})
    with pytest.raises(npz.InputError) as error:
        npz.read_reference_statistics(str(tmp_path / "neg.npz"))
    assert str(error.value) == (f"{tmp_path / 'neg.npz'}: stored statistics: sigma_s is not a covariance matrix: it "
                                "has a negative eigenvalue (-1; a covariance has none below -1e-06 x its trace); "
                                "recompute the statistics")
    np.savez(tmp_path / "obj.npz", arr_0=images, **{**good, "mu": np.array([None, 1, 2], dtype=object)})
    with pytest.raises(npz.InputError, match=r"stored statistics: mu is an object array \(pickled Python objects\)"):
        npz.read_reference_statistics(str(tmp_path / "obj.npz"))


# ---------------------------------------------------------------------------------------- 17c
class _Features:
    """Stands in for Inception (8-d features); the first evaluation's features hold a NaN."""

    calls = 0

    def __init__(self, weights_path, device="cpu"):
        pass

    def __call__(self, images):
        type(self).calls += 1
        rng = np.random.default_rng(type(self).calls)
        pool = rng.standard_normal((len(images), 8)).astype(np.float32)
        if type(self).calls == 1:
            pool[0, 0] = np.nan
        return {"pool": pool, "spatial": pool[:, :4].copy()}


def test_non_finite_statistics_during_training_skip_that_evaluation(tiny_data, tmp_path, monkeypatch):
    from evaluation import features
    from training.loop import train

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in weights")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 8)), rng.standard_normal((20, 4))
    meta = {"num_images": 20, "resolution": [16, 16], "inception": weights_identity(str(weights)), "dinov2": None,
            "swd": None}
    mu, sigma = feature_statistics(x)
    mu_s, sigma_s = feature_statistics(y)
    save_statistics(ReferenceStatistics(dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s), meta),
                    str(tmp_path / "ref.npz"))
    monkeypatch.setattr(features, "InceptionFeatureExtractor", _Features)
    _Features.calls = 0
    cfg = tiny_config(tiny_data, str(tmp_path / "out"), eval_every=2, eval_num_samples=6, eval_metrics="[fid]",
                      eval_ref_stats=str(tmp_path / "ref.npz"), eval_inception_weights=str(weights),
                      **{"eval_sampler.num_steps_per_scale": "[2,2]", "eval_sampler.batch_size": 4})
    result = train(cfg)
    assert result.steps == 4 and _Features.calls == 2
    records = compare.read_metrics(result.exp_dir)
    assert [r["step"] for r in records if "fid" in r] == [4] and np.isfinite(records[-1]["fid"])
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    with open(os.path.join(result.exp_dir, "log.txt")) as f:
        warnings = [line.rstrip("\n") for line in f if "WARNING: evaluation" in line]
    assert len(warnings) == 1
    assert warnings[0].split("] ", 1)[1] == (
        "WARNING: evaluation at step 2 skipped: the samples' statistics: non-finite values (NaN or inf) in mu "
        "(1 of 8 values), sigma (15 of 64 values); a Fréchet distance of them is undefined (recompute the "
        "statistics, or check the feature weights); no metrics are recorded for it, the training goes on")


# ---------------------------------------------------------------------------------------- 20
def test_compare_names_a_file_that_is_not_text(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "images_seen": 8}\n\x89PNG\r\n\x1a\n\xff\xfe')
    assert compare.main([str(run), "--metric", "fdd"]) == 2
    assert _one_line(capsys) == (f"error: {run / 'metrics.jsonl'}: not a text file (the byte at offset 30 is not "
                                 "UTF-8); expected metrics.jsonl, one JSON object per line")
    (run / "metrics.jsonl").write_text('{"step": 1, "images_seen": 8, "fdd": 3.0}\n')
    (tmp_path / "file").write_text("x")
    table = tmp_path / "file" / "table.md"
    assert compare.main([str(run), "--metric", "fdd", "--table", str(table)]) == 1
    assert capsys.readouterr().err == f"error: cannot write {table}: [Errno 17] File exists\n"


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_a_set_with_itself_is_zero_not_negative(method):
    x = np.random.default_rng(0).standard_normal((50, 16)) * 3  # rounding leaves -5.7e-13 (sqrtm), -1.7e-13 (eigh)
    mu, sigma = feature_statistics(x)
    assert frechet_distance(mu, sigma, mu, sigma, method=method) == 0.0
