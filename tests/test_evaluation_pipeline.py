"""Pipeline wiring with a stand-in feature extractor: stored reference statistics, which
reference images are encoded, and --num-ref-pr, checked against independent formulas."""
import numpy as np
import pytest
from scipy import linalg

from evaluation import evaluate as evaluate_module
from evaluation import features, npz

POOL, SPATIAL = 4, 3  # 5 samples give full-rank covariances


class FakeInception:
    """Features straight from the pixels, so tests know them without a network."""

    seen = []

    def __init__(self, weights_path, device):
        FakeInception.seen = []

    def __call__(self, images):
        FakeInception.seen.append(len(images))
        flat = images.reshape(len(images), -1).astype(np.float32) / 255
        return {"pool": flat[:, :POOL], "spatial": flat[:, POOL:POOL + SPATIAL], "logits": 4 * flat[:, :4]}


@pytest.fixture
def fake_network(monkeypatch):
    monkeypatch.setattr(npz, "POOL_DIM", POOL)
    monkeypatch.setattr(npz, "SPATIAL_DIM", SPATIAL)
    monkeypatch.setattr(features, "InceptionFeatureExtractor", FakeInception)
    monkeypatch.setattr(features, "resolve_inception_weights", lambda path: "unused")


def _fd_scipy(x, mu, sigma):
    mu_x, s_x = x.mean(0), np.cov(x, rowvar=False)
    return np.sum((mu_x - mu) ** 2) + np.trace(s_x) + np.trace(sigma) - 2 * np.trace(linalg.sqrtm(s_x @ sigma)).real


def _pr(ref, smp, k=3):
    d = lambda u, v: ((u[:, None] - v[None]) ** 2).sum(-1)  # noqa: E731
    r_ref, r_smp, d_rs = np.sort(d(ref, ref), 1)[:, k], np.sort(d(smp, smp), 1)[:, k], d(ref, smp)
    return np.mean((d_rs <= r_ref[:, None]).any(0)), np.mean((d_rs <= r_smp[None]).any(1))


def _batches(tmp_path, stored):
    rng = np.random.default_rng(0)
    ref, smp = rng.integers(0, 256, (7, 2, 2, 3), np.uint8), rng.integers(0, 256, (5, 2, 2, 3), np.uint8)
    stats = dict(mu=np.full(POOL, 0.5), sigma=np.diag(np.linspace(0.05, 0.1, POOL)),
                 mu_s=np.full(SPATIAL, 0.4), sigma_s=np.diag(np.linspace(0.02, 0.08, SPATIAL))) if stored else {}
    np.savez(tmp_path / "ref.npz", arr_0=ref, **stats)
    np.savez(tmp_path / "smp.npz", arr_0=smp)
    return ref, smp, stats


def _features(images):
    return FakeInception(None, None)(images)


def test_stored_reference_statistics_are_used_and_only_pr_images_encoded(tmp_path, fake_network):
    ref, smp, stats = _batches(tmp_path, stored=True)
    results = evaluate_module.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), num_ref_pr=4,
                                       batch_size=3, fid_method="sqrtm", progress=False)
    assert FakeInception.seen == [3, 1, 3, 2]  # 4 reference images, then the 5 samples
    f_ref, f_smp = _features(ref[:4]), _features(smp)
    assert results["reference_statistics"] == "stored"
    assert (results["num_ref"], results["num_ref_pr"], results["num_samples"]) == (7, 4, 5)
    assert results["fid"] == pytest.approx(_fd_scipy(f_smp["pool"].astype(float), stats["mu"], stats["sigma"]), rel=1e-6)
    assert results["sfid"] == pytest.approx(
        _fd_scipy(f_smp["spatial"].astype(float), stats["mu_s"], stats["sigma_s"]), rel=1e-6)
    assert (results["precision"], results["recall"]) == _pr(f_ref["pool"].astype(float), f_smp["pool"].astype(float))


def test_computed_reference_statistics_use_every_reference_image(tmp_path, fake_network):
    ref, smp, _ = _batches(tmp_path, stored=False)
    results = evaluate_module.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), num_ref_pr=4,
                                       batch_size=64, fid_method="sqrtm", progress=False)
    assert FakeInception.seen == [7, 5]
    f_ref, f_smp = _features(ref), _features(smp)
    pool_ref = f_ref["pool"].astype(float)
    assert results["reference_statistics"] == "computed"
    assert results["fid"] == pytest.approx(
        _fd_scipy(f_smp["pool"].astype(float), pool_ref.mean(0), np.cov(pool_ref, rowvar=False)), rel=1e-6)
    assert (results["precision"], results["recall"]) == _pr(pool_ref[:4], f_smp["pool"].astype(float))


def test_negative_num_ref_pr_is_rejected(tmp_path, fake_network):
    _batches(tmp_path, stored=False)
    with pytest.raises(npz.InputError, match="--num-ref-pr"):
        evaluate_module.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), num_ref_pr=-1)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # np.cov of an inf
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_statistics_stop_with_one_line_naming_their_source(tmp_path, fake_network, monkeypatch, capsys,
                                                                     bad):
    """Never handed to sqrtm (which does not return on a 2048-d matrix with a NaN): stored ones are
    refused when read, with the file's name; computed ones before the distance, as the samples'."""
    ref, smp, stats = _batches(tmp_path, stored=True)
    sigma = stats["sigma"].copy()
    sigma[1, 2] = bad
    np.savez(tmp_path / "bad_ref.npz", arr_0=ref, **{**stats, "sigma": sigma})
    args = [str(tmp_path / "bad_ref.npz"), str(tmp_path / "smp.npz"), "--no-progress", "--device", "cpu"]
    assert evaluate_module.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'bad_ref.npz'}: stored statistics: non-finite values (NaN or inf) in sigma "
                   "(1 of 16 values); a Fréchet distance of them is undefined (recompute the statistics, or check "
                   "the feature weights)")

    class NonFiniteInception(FakeInception):  # a broken network: features of the samples overflow
        def __call__(self, images):
            out = super().__call__(images)
            out["pool"][0, 0] = bad
            return out

    monkeypatch.setattr(features, "InceptionFeatureExtractor", NonFiniteInception)
    with pytest.raises(npz.InputError, match=r"^the samples' statistics \(.*smp.npz\): non-finite values .* in mu "
                                             r"\(1 of 4 values\), sigma \(7 of 16 values\)"):  # row and column 0
        evaluate_module.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), num_ref_pr=4,
                                 fid_method="sqrtm", progress=False)


def test_out_json_that_cannot_be_written_is_one_line(tmp_path, fake_network, monkeypatch, capsys):
    import errno
    import os

    _batches(tmp_path, stored=True)

    def read_only(*args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(evaluate_module, "write_json_atomic", read_only)
    out = tmp_path / "results.json"
    assert evaluate_module.main([str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz"), "--num-ref-pr", "4",
                                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot write {out}: [Errno 30] Read-only file system"
