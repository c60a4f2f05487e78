"""evaluation.ref_stats (folder, ZIP, .npz; 1 and 2 processes), the statistics file, and
evaluate / OnlineEvaluator scoring against it, with random Inception and small DINOv2 weights.

Statistics are checked against np.mean / np.cov of features computed image by image; scores
against a statistics file are checked against the same scores from a reference batch holding
the same images (whose statistics evaluate computes with np.cov).
"""
import json
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import evaluate as evaluate_module
from evaluation import features, ref_stats
from evaluation.fdd import DinoV2FeatureExtractor
from evaluation.inception import InceptionFeatureExtractor, save_random_inception_weights
from evaluation.npz import InputError
from evaluation.online import OnlineEvaluator
from evaluation.stats_file import check_compatible, load_statistics
from evaluation.swd import SWDSettings, swd
from conftest import SMALL_DINOV2, save_random_dinov2_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, seed, size=16):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, size // 4, size // 4, 3)).repeat(4, 1).repeat(4, 2)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def _write_dataset(folder, images):
    labels = []
    for i, img in enumerate(images):
        rel = f"{i // 1000:05d}/img{i:08d}.png"
        os.makedirs(os.path.join(folder, os.path.dirname(rel)), exist_ok=True)
        Image.fromarray(img).save(os.path.join(folder, rel))
        labels.append([rel, i % 2])
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"labels": labels, "classes": ["a", "b"]}, f)
    return str(folder)


class _Recording:
    """Wraps a feature extractor class and keeps every output (features of the real network)."""

    def __init__(self, cls, store):
        self.cls, self.store = cls, store

    def __call__(self, *args, **kwargs):
        net, store = self.cls(*args, **kwargs), self.store

        def run(images):
            out = net(images)
            store.append(out)
            return out
        return run


def _cat(outputs, key=None):
    return np.concatenate([o[key] if key else o for o in outputs]).astype(np.float64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref_stats")
    inception = save_random_inception_weights(str(tmp / "inception.pth"), seed=0)
    save_random_dinov2_weights(tmp / "dinov2.pth")
    ref, smp = _images(5, seed=0), _images(4, seed=1)
    folder = _write_dataset(tmp / "ref", ref)
    np.savez(tmp / "ref.npz", arr_0=ref)
    np.savez(tmp / "smp.npz", arr_0=smp)
    common = ["--inception-weights", inception, "--dinov2-model", SMALL_DINOV2, "--dinov2-weights",
              str(tmp / "dinov2.pth"), "--batch-size", "3", "--workers", "0", "--device", "cpu", "--no-progress"]
    stats_path = str(tmp / "stats.npz")
    recorded = {"inception": [], "dinov2": [], "smp_inception": [], "smp_dinov2": []}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "InceptionFeatureExtractor", _Recording(InceptionFeatureExtractor, recorded["inception"]))
        patch.setattr(features, "DinoV2FeatureExtractor", _Recording(DinoV2FeatureExtractor, recorded["dinov2"]))
        assert ref_stats.main([folder, "--out", stats_path, "--swd-images", "3", "--seed", "3", *common]) == 0
        patch.setattr(features, "InceptionFeatureExtractor",
                      _Recording(InceptionFeatureExtractor, recorded["smp_inception"]))
        patch.setattr(features, "DinoV2FeatureExtractor", _Recording(DinoV2FeatureExtractor, recorded["smp_dinov2"]))
        scores = evaluate_module.evaluate(
            stats_path, str(tmp / "smp.npz"), inception_weights=inception, device="cpu", batch_size=4, fdd=True,
            dinov2_model=SMALL_DINOV2, dinov2_weights=str(tmp / "dinov2.pth"), fid_method="eigh", swd=True,
            progress=False)
    return dict(tmp=tmp, ref=ref, smp=smp, folder=folder, inception=inception, dinov2=str(tmp / "dinov2.pth"),
                stats=stats_path, common=common, recorded=recorded, scores=scores)


def _fd(x, y):
    """Fréchet distance of two feature sets, rank-deficient covariances allowed (eigenvalues of S_x S_y)."""
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(sx @ sy).real, 0, None)).sum()
    return np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx) + np.trace(sy) - 2 * tr_sqrt


def test_statistics_equal_mean_and_cov_of_the_features(setup):
    stats, rec = load_statistics(setup["stats"]), setup["recorded"]
    assert len(_cat(rec["inception"], "pool")) == 5
    for key, x in (("", _cat(rec["inception"], "pool")), ("_s", _cat(rec["inception"], "spatial")),
                   ("_dinov2", _cat(rec["dinov2"]))):
        mu, sigma = stats.arrays["mu" + key], stats.arrays["sigma" + key]
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-7, atol=1e-9 * np.abs(sigma).max())
    assert stats.arrays["sigma_dinov2"].shape == (384, 384)
    expected_idx = np.sort(np.random.default_rng(3).choice(5, 3, replace=False))
    np.testing.assert_array_equal(stats.arrays["swd_images"], setup["ref"][expected_idx])
    meta = stats.meta
    assert (meta["num_images"], meta["resolution"]) == (5, [16, 16])
    assert meta["swd"] == {"num_images": 3, "seed": 3, **SWDSettings().as_meta()}
    assert meta["inception"]["file"] == "inception.pth" and len(meta["inception"]["sha256"]) == 64
    assert meta["dinov2"]["model"] == SMALL_DINOV2 and stats.available() == ("fid", "sfid", "fdd", "swd")


def test_zip_and_npz_inputs_give_the_same_swd_images(setup, tmp_path):
    from data.storage import zip_folder

    zip_path = str(tmp_path / "ref.zip")
    zip_folder(setup["folder"], zip_path)
    for source in (zip_path, str(setup["tmp"] / "ref.npz")):
        out = str(tmp_path / "s.npz")
        assert ref_stats.main([source, "--out", out, "--no-inception", "--no-dinov2", "--swd-images", "all",
                               "--workers", "0", "--no-progress"]) == 0
        stats = load_statistics(out)
        np.testing.assert_array_equal(stats.arrays["swd_images"], setup["ref"])
        assert stats.available() == ("swd",) and stats.meta["inception"] is None


def test_evaluate_with_statistics_scores_the_recorded_features(setup, capsys):
    scores, rec = setup["scores"], setup["recorded"]
    smp_inc = {key: _cat(rec["smp_inception"], key) for key in ("pool", "spatial", "logits")}
    smp_dino = _cat(rec["smp_dinov2"])
    for key, ref_x, smp_x in (("fid", _cat(rec["inception"], "pool"), smp_inc["pool"]),
                              ("sfid", _cat(rec["inception"], "spatial"), smp_inc["spatial"]),
                              ("fdd", _cat(rec["dinov2"]), smp_dino)):
        assert scores[key] == pytest.approx(_fd(smp_x.astype(np.float64), ref_x), rel=1e-5), key
    logits = smp_inc["logits"].astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected_is = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), axis=1)))
    assert scores["inception_score"] == pytest.approx(expected_is, rel=1e-6)
    # SWD uses the stored subset of the reference images.
    subset = setup["ref"][np.sort(np.random.default_rng(3).choice(5, 3, replace=False))]
    assert scores["swd"] == pytest.approx(swd(setup["smp"], subset).mean, rel=1e-9)
    assert scores["precision"] is None and "reference images" in scores["not_computed"]["recall"]
    assert scores["reference_statistics"] == "statistics file" and scores["num_ref"] == 5


def test_cli_notes_that_precision_recall_need_images(setup, capsys, monkeypatch):
    class Fake:  # stands in for Inception: random features of its dimensions
        def __init__(self, *args):
            pass

        def __call__(self, images):
            rng = np.random.default_rng(len(images))
            return {"pool": rng.random((len(images), 2048)), "spatial": rng.random((len(images), 2023)),
                    "logits": np.zeros((len(images), 1008))}

    monkeypatch.setattr(features, "InceptionFeatureExtractor", Fake)
    code = evaluate_module.main([setup["stats"], str(setup["tmp"] / "smp.npz"), "--inception-weights",
                                 setup["inception"], "--device", "cpu", "--fid-method", "eigh", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0 and "note: precision not computed" in captured.err
    assert json.loads(captured.out)["recall"] is None


class _Ranks:
    """An in-process all-gather for ``n`` threads standing in for processes (each gets pickled copies)."""

    def __init__(self, n):
        self.barrier, self.slots = threading.Barrier(n), [None] * n

    def gather(self, rank):
        def all_gather(obj):
            self.slots[rank] = pickle.dumps(obj)
            self.barrier.wait()
            parts = [pickle.loads(p) for p in self.slots]
            self.barrier.wait()
            return parts
        return all_gather


def test_online_evaluator_matches_evaluate_and_leaves_random_streams(setup):
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    metrics = ["fid", "sfid", "is", "swd"]
    evaluators = [OnlineEvaluator(setup["stats"], metrics, (16, 16), inception_weights=setup["inception"])
                  for _ in range(2)]
    torch.testing.assert_close(torch.rand(3), expected_draw)
    alone = evaluators[0](setup["smp"])
    for key in ("fid", "sfid", "inception_score", "swd", "swd_16"):
        assert alone[key] == pytest.approx(setup["scores"][key], rel=1e-4), key
    # two processes, each with the samples of indices rank::2, as training evaluates: every pass is merged
    ranks, results = _Ranks(2), [None, None]

    def run(rank):
        mine = list(range(rank, len(setup["smp"]), 2))
        results[rank] = evaluators[rank].score(setup["smp"][mine], ranks.gather(rank), mine)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results[0] == results[1]
    for key in alone:
        assert results[0][key] == pytest.approx(alone[key], rel=1e-6), key
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 16, 16, 3\]"):
        evaluators[0](setup["smp"].astype(np.float32))


def test_incompatible_statistics_are_rejected(setup, tmp_path):
    stats = load_statistics(setup["stats"])
    ok = dict(inception_weights=setup["inception"], dinov2_model=SMALL_DINOV2, dinov2_weights=setup["dinov2"])
    check_compatible(stats, ["fid", "sfid", "fdd", "swd"], (16, 16), **ok)
    with pytest.raises(InputError, match="16x16 images, but the samples are 32x32"):
        check_compatible(stats, ["fid"], (32, 32), **ok)
    other = save_random_inception_weights(str(tmp_path / "other.pth"), seed=1)
    with pytest.raises(InputError, match="computed with inception weights inception.pth"):
        check_compatible(stats, ["fid"], (16, 16), **{**ok, "inception_weights": other})
    with pytest.raises(InputError, match="dinov2 model"):
        check_compatible(stats, ["fdd"], (16, 16), **{**ok, "dinov2_model": "vit_large_patch14_dinov2.lvd142m"})
    with pytest.raises(InputError, match="unknown metric"):
        check_compatible(stats, ["no_such_metric"], (16, 16), **ok)
    swd_only = str(tmp_path / "swd.npz")
    assert ref_stats.main([setup["folder"], "--out", swd_only, "--no-inception", "--no-dinov2", "--swd-images", "all",
                           "--workers", "0", "--no-progress"]) == 0
    with pytest.raises(InputError, match=r"cannot score \['fid'\]"):
        OnlineEvaluator(swd_only, ["fid", "swd"], (16, 16), inception_weights=setup["inception"])
    with pytest.raises(InputError, match="no such file"):
        OnlineEvaluator(str(tmp_path / "missing.npz"), ["swd"], (16, 16))


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_statistics(setup, tmp_path):
    out = str(tmp_path / "ddp.npz")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "evaluation.ref_stats", setup["folder"], "--out", out, "--swd-images", "3",
                           "--seed", "3", "--no-dinov2", *setup["common"]],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = load_statistics(setup["stats"]), load_statistics(out)
    assert sorted(two.arrays) == ["mu", "mu_s", "sigma", "sigma_s", "swd_histograms", "swd_images"]
    assert {**one.meta, "dinov2": None} == two.meta
    for key, value in two.arrays.items():
        value = one.arrays[key]
        # float32 features of batches of 2 vs 3 images differ by convolution rounding
        np.testing.assert_allclose(two.arrays[key], value, rtol=1e-4, atol=1e-5 * np.abs(value).max(), err_msg=key)
