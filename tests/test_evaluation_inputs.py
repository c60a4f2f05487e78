"""Reading .npz batches, bad inputs and missing weights: one clear message, no network work."""
import re
import time

import numpy as np
import pytest
import torch

from evaluation import evaluate as evaluate_cli
from evaluation import inception
from evaluation.inception import WeightsError, resolve_inception_weights
from evaluation.npz import InputError, NpzImageBatch, check_same_resolution, read_reference_statistics


def _images(n=5, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("compressed", [False, True])
def test_streaming_reader_returns_the_array_in_batches(tmp_path, compressed):
    images = _images(11)
    path = tmp_path / "b.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images)
    batch = NpzImageBatch(str(path))
    assert len(batch) == 11 and batch.info.resolution == (8, 8)
    parts = list(batch.iter_batches(4))
    assert [len(p) for p in parts] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(parts), images)
    np.testing.assert_array_equal(np.concatenate(list(batch.iter_batches(3, limit=5))), images[:5])
    assert parts[0].flags.writeable


@pytest.mark.parametrize("array, message", [
    (np.zeros((4, 8, 8, 3), np.float32), "dtype float32"),
    (np.zeros((8, 8, 3), np.uint8), "rank 3"),
    (np.zeros((4, 3, 8, 8), np.uint8), "channel-first"),
    (np.zeros((4, 8, 8, 4), np.uint8), "4 channels"),
    (np.zeros((0, 8, 8, 3), np.uint8), "holds no image"),
])
def test_bad_arrays_raise_one_clear_value_error(tmp_path, array, message):
    path = tmp_path / "bad.npz"
    np.savez(path, arr_0=array)
    with pytest.raises(ValueError, match=message) as info:
        NpzImageBatch(str(path))
    assert isinstance(info.value, InputError)
    assert str(path) in str(info.value) and "uint8 [N, H, W, 3]" in str(info.value)


def test_missing_arr_0_missing_file_and_not_a_zip(tmp_path):
    np.savez(tmp_path / "named.npz", images=_images())
    with pytest.raises(InputError, match=r"no 'arr_0' array \(found \['images'\]\)"):
        NpzImageBatch(str(tmp_path / "named.npz"))
    with pytest.raises(InputError, match="no such file"):
        NpzImageBatch(str(tmp_path / "absent.npz"))
    np.save(tmp_path / "plain.npy", _images())
    with pytest.raises(InputError, match="not a readable .npz"):
        NpzImageBatch(str(tmp_path / "plain.npy"))


def test_resolution_mismatch_is_an_error_unless_allowed(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=_images(size=16))
    np.savez(tmp_path / "smp.npz", arr_0=_images(size=8))
    ref, smp = NpzImageBatch(str(tmp_path / "ref.npz")), NpzImageBatch(str(tmp_path / "smp.npz"))
    with pytest.raises(InputError, match="is 16x16 but samples .* are 8x8.*allow-resolution-mismatch"):
        check_same_resolution(ref.info, smp.info)
    check_same_resolution(ref.info, smp.info, allow_mismatch=True)


def test_reference_statistics_present_absent_partial_and_wrong_shape(tmp_path):
    np.savez(tmp_path / "none.npz", arr_0=_images())
    assert read_reference_statistics(str(tmp_path / "none.npz")) is None
    stats = dict(mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32), mu_s=np.ones(2023), sigma_s=np.eye(2023))
    np.savez(tmp_path / "full.npz", arr_0=_images(), **stats)
    got = read_reference_statistics(str(tmp_path / "full.npz"))
    assert got["sigma"].dtype == np.float64 and got["sigma_s"].shape == (2023, 2023)
    np.savez(tmp_path / "partial.npz", arr_0=_images(), mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(InputError, match=r"lacks \['mu_s', 'sigma_s'\]"):
        read_reference_statistics(str(tmp_path / "partial.npz"))
    np.savez(tmp_path / "wrong.npz", arr_0=_images(), **dict(stats, mu=np.zeros(64)))
    with pytest.raises(InputError, match=r"expected \(2048,\)"):
        read_reference_statistics(str(tmp_path / "wrong.npz"))


def test_offline_without_cached_weights_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception, "host_reachable", lambda url, timeout=5.0: False)
    start = time.monotonic()
    with pytest.raises(WeightsError, match="weights-inception-2015-12-05-6726825d.pth.*--inception-weights"):
        resolve_inception_weights(None)
    assert time.monotonic() - start < 1.0
    cached = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_inception_weights(None) == str(cached)
    with pytest.raises(WeightsError, match="no such file"):
        resolve_inception_weights(str(tmp_path / "missing.pth"))


def test_wrong_weights_file_is_reported(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(WeightsError, match="not loadable as torch-fidelity Inception weights"):
        inception.InceptionFeatureExtractor(str(bad))


def test_pytorch_fids_inception_file_gets_one_line_naming_the_file_to_use(tmp_path, capsys):
    """pytorch-fid's port has torch-fidelity's layer names and shapes, so it would load silently."""
    wrong = inception.save_random_inception_weights(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    np.savez(tmp_path / "ref.npz", arr_0=_images(size=8))
    assert evaluate_cli.main([str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "--inception-weights", wrong,
                              "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: --inception-weights {wrong}: that is pytorch-fid's pt_inception-2015-12-05-6726825d.pth; this "
        "codebase uses torch-fidelity's weights-inception-2015-12-05-6726825d.pth (the same network, another file "
        f"and hash): download {inception.INCEPTION_WEIGHTS_URL}\n")


def test_a_dataset_folder_as_reference_says_to_run_ref_stats_first(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    np.savez(tmp_path / "smp.npz", arr_0=_images(size=8))
    assert evaluate_cli.main([str(folder), str(tmp_path / "smp.npz"), "--metrics", "fid,swd", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: reference {folder} is a folder (a dataset?); evaluate compares with a reference batch .npz (arr_0) "
        "or with the statistics file of a dataset, made once by: python -m evaluation.ref_stats "
        f"{folder} --out {folder}_stats.npz --metrics fid,swd\n")


@pytest.mark.parametrize("setup, message", [
    ("dtype", "dtype int64"),
    ("resolution", "is 8x8 but samples"),
    ("too_few", "3 image.s.; pr needs at least 4"),
    ("weights", "--inception-weights .*no such file"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, capsys, setup, message):
    ref, smp = tmp_path / "ref.npz", tmp_path / "smp.npz"
    np.savez(ref, arr_0=_images(size=8))
    samples = {"dtype": _images(size=8).astype(np.int64), "resolution": _images(size=16),
               "too_few": _images(n=3, size=8), "weights": _images(size=8)}[setup]
    np.savez(smp, arr_0=samples)
    code = evaluate_cli.main([str(ref), str(smp), "--inception-weights", str(tmp_path / "nope.pth"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err)


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_statistics_file_with_non_finite_values_is_refused_when_read(tmp_path, bad):
    from evaluation.metrics import frechet_distance
    from evaluation.stats_file import ReferenceStatistics, load_statistics, save_statistics

    mu = np.zeros(4)
    mu[3] = bad
    meta = {"num_images": 5, "resolution": [8, 8], "inception": None, "dinov2": None, "swd": None}
    path = str(tmp_path / "stats.npz")
    save_statistics(ReferenceStatistics({"mu_dinov2": mu, "sigma_dinov2": np.eye(4)}, meta), path)
    with pytest.raises(InputError, match=re.escape(f"reference statistics {path}: non-finite values (NaN or inf) "
                                                   "in mu_dinov2 (1 of 4 values)")):
        load_statistics(path)
    # the last guard before any square root, whichever caller forgot to check
    with pytest.raises(InputError, match="^the second statistics: non-finite values .* in mu "):
        frechet_distance(np.zeros(4), np.eye(4), mu, np.eye(4), method="sqrtm")


def test_the_inception_address_is_torch_fidelitys():
    """Written out in evaluation/inception.py so that importing it does not import torch-fidelity."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert inception.INCEPTION_WEIGHTS_URL == URL_INCEPTION_V3
