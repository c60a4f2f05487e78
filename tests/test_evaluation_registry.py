"""Metrics as a registry: a metric registered from this file runs through ref_stats, evaluate, the
report and training-time evaluation with no other edit; SWD runs offline with no weights; the
streaming accumulators against whole-set formulas. Expected name lists come from the registry."""
import json

import numpy as np
import pytest
import torch

from evaluation import evaluate as evaluate_cli
from evaluation import features, ref_stats, report
from evaluation.metric_base import METRICS, Accumulator, Column, FeatureRows, MeanCovariance, Metric, array_batches, stream
from evaluation.scores import build_metrics, lower_is_better, metric_classes
from evaluation.inception import save_random_inception_weights
from evaluation.metrics import feature_statistics, inception_score
from evaluation.npz import InputError
from evaluation.online import OnlineEvaluator
from evaluation.stats_file import array_keys, load_statistics


class _MeanColour(Accumulator):
    """Running per-channel sums of the images (float64)."""

    def __init__(self):
        super().__init__(("images",))
        self.count, self.total = 0, np.zeros(3)

    def update(self, features, indices):
        self.count += len(indices)
        images = features["images"]
        self.total += images.reshape(-1, 3).sum(axis=0, dtype=np.float64) / (images.shape[1] * images.shape[2])

    def merge(self, other):
        self.count += other.count
        self.total += other.total

    def result(self):
        return self.total / self.count


class ExampleColourShift(Metric):
    """Distance of the mean colours (what SWD's per-set normalisation cannot see)."""

    needs = ("images",)
    columns = (Column("colour shift", "example_colour_shift", digits=1),)
    stores = ("example_mean_colour",)

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def accumulator(self, role):
        return _MeanColour()

    def score(self, samples, reference, names=None):
        return {"example_colour_shift": self.scale * float(np.linalg.norm(samples - reference))}

    def file_arrays(self, reference, meta, where):
        return {"example_mean_colour": reference}, None

    def reference_from_file(self, arrays, meta, where):
        return arrays.get("example_mean_colour") if meta is not None else None


@pytest.fixture
def example_metric():
    METRICS.register("example_colour_shift")(ExampleColourShift)
    yield "example_colour_shift"
    METRICS.unregister("example_colour_shift")


def _images(n, seed, size=16, tint=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, size, size, 3)) + tint, 0, 255).astype(np.uint8)


def test_a_metric_registered_here_runs_through_every_consumer(example_metric, tmp_path, capsys):
    ref, smp = _images(6, 0), _images(5, 1, tint=np.array([40, 0, 0]))
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "smp.npz", arr_0=smp)
    expected = float(np.linalg.norm(smp.reshape(-1, 3).mean(0) - ref.reshape(-1, 3).mean(0)))
    # a statistics file stores what the metric says, and the file's keys follow the registry
    assert "example_mean_colour" in array_keys()
    stats = str(tmp_path / "stats.npz")
    assert ref_stats.main([str(tmp_path / "ref.npz"), "--out", stats, "--metrics", example_metric,
                           "--no-progress", "--device", "cpu"]) == 0
    assert load_statistics(stats).available() == (example_metric,)
    # evaluate against the batch and against the statistics file; its parameter is a flag
    for reference in (str(tmp_path / "ref.npz"), stats):
        out = tmp_path / "r.json"
        assert evaluate_cli.main([reference, str(tmp_path / "smp.npz"), "--metrics", example_metric,
                                  "--example-colour-shift-scale", "2", "--out", str(out), "--no-progress"]) == 0
        result = json.loads(out.read_text())
        assert result["example_colour_shift"] == pytest.approx(2 * expected, rel=1e-9)
        assert result["inputs"]["inception_weights"] is None  # no network was needed
    capsys.readouterr()
    # the report shows its column, with its title and digits
    md, _ = report.report([str(out)])
    assert md.splitlines()[0].endswith("| colour shift |") and f"| {2 * expected:.1f} |" in md
    # training-time evaluation
    scorer = OnlineEvaluator(stats, [{"name": example_metric, "scale": 1.0}, "is"], (16, 16),
                             inception_weights=save_random_inception_weights(str(tmp_path / "inception.pth")))
    values = scorer(smp)  # IS needs no reference, so a file of any metric serves it
    assert values[example_metric] == pytest.approx(expected, rel=1e-9) and values["inception_score"] >= 1


def test_swd_runs_offline_with_no_inception_file_anywhere(tmp_path, monkeypatch, capsys):
    """`--metrics swd` against an ADM batch and against a ref_stats file: no weights are located."""
    def no_weights(*args, **kwargs):
        raise AssertionError("SWD located network weights")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    monkeypatch.setattr(features, "resolve_inception_weights", no_weights)
    monkeypatch.setattr(features, "resolve_dinov2_weights", no_weights)
    np.savez(tmp_path / "ref.npz", arr_0=_images(12, 0))
    np.savez(tmp_path / "smp.npz", arr_0=_images(9, 1))
    stats = str(tmp_path / "stats.npz")
    assert ref_stats.main([str(tmp_path / "ref.npz"), "--out", stats, "--metrics", "swd", "--no-progress",
                           "--device", "cpu"]) == 0
    values = []
    for reference in (str(tmp_path / "ref.npz"), stats):
        out = tmp_path / "r.json"
        assert evaluate_cli.main([reference, str(tmp_path / "smp.npz"), "--metrics", "swd", "--out", str(out),
                                  "--no-progress"]) == 0
        values.append(json.loads(out.read_text())["swd"])
    assert values[0] == values[1] > 0  # the stored summary is the batch's own
    capsys.readouterr()


def test_metric_lists_are_checked_against_the_registry():
    import inspect

    names = [cls.registered_name for cls in metric_classes()
             if inspect.Parameter.empty not in METRICS.params(cls.registered_name).values()]
    assert [m.name for m in build_metrics(",".join(names))] == names
    with pytest.raises(ValueError, match="unknown metric 'no_such_metric'"):
        build_metrics("fid,no_such_metric")
    with pytest.raises(ValueError, match="given more than once"):
        build_metrics(["swd", {"name": "swd", "seed": 2}])
    with pytest.raises(ValueError, match="no metric given"):
        build_metrics("")
    assert build_metrics(["fid"], {"method": "eigh", "seed": 3})[0].method == "eigh"  # shared options by name
    for cls in metric_classes():
        for column in cls.columns:
            assert cls.owns(column.key) and lower_is_better(column.key) == (not cls.higher_is_better)
    assert lower_is_better("loss")


def test_report_columns_and_formats_come_from_the_metrics():
    column = Column("KID", "kid", scale=1e3, digits=2, spread="kid_std")
    assert column.cell({"kid": 0.01234, "kid_std": 0.0005}) == "12.34 ± 0.50"
    assert column.cell({"kid": None}) == "" and Column("FID", "fid").cell({"fid": 3.14159}) == "3.14"
    keys = report.metric_keys()
    assert keys == [k for cls in metric_classes() for k in cls.result_keys()]


def test_streamed_statistics_equal_whole_set_formulas():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((23, 5)).astype(np.float32)
    batches = array_batches(x, batch_size=4)
    feats = lambda batch, kinds: {"f": batch}  # noqa: E731
    done = stream({"sums": MeanCovariance("f"), "rows": FeatureRows("f", limit=10),
                   "sample": FeatureRows("f", max_rows=6, seed=1)}, batches, feats)
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(done["sums"].result()[0], mu, rtol=1e-12)
    np.testing.assert_allclose(done["sums"].result()[1], sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(done["rows"].result(), x[:10])
    sample = done["sample"].result()
    assert sample.shape == (6, 5) and all(any((row == x).all(1)) for row in sample)
    # the sample depends on the seed and the indices only: other batches, other processes, same rows
    parts = [stream({"s": FeatureRows("f", max_rows=6, seed=1)}, array_batches(x[r::3], np.arange(r, 23, 3), 2),
                    feats)["s"] for r in range(3)]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    np.testing.assert_array_equal(merged.result(), sample)


def test_inception_score_streams_exactly():
    logits = np.random.default_rng(0).standard_normal((23, 11)) * 3
    metric = build_metrics("is")[0]
    metric.split_size = 5
    done = stream({"is": metric.accumulator("samples")}, array_batches(logits, batch_size=4),
                  lambda batch, kinds: {"inception_logits": batch})
    got = metric.score(done["is"].result(), None)["inception_score"]
    assert got == pytest.approx(inception_score(logits, split_size=5), rel=1e-12)


def test_ref_stats_refuses_metrics_a_file_cannot_hold(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=_images(4, 0))
    unstorable = [cls.registered_name for cls in metric_classes() if not cls.stores]
    assert unstorable
    for name in unstorable:
        with pytest.raises(InputError, match=f"--metrics {name}: "):
            ref_stats.compute_statistics(str(tmp_path / "ref.npz"), metrics=name, progress=False)


def test_a_result_written_before_the_registry_still_reports(tmp_path):
    """The keys evaluate wrote on main @572e47e (no "metrics" list; precision null against statistics)."""
    old = {"fid": 12.3456, "sfid": 4.5, "inception_score": 101.25, "precision": None, "recall": None,
           "not_computed": {"precision": "...", "recall": "..."}, "swd": 41.25, "swd_32": 50.0, "swd_16": 32.5,
           "num_samples": 50000, "num_ref": 1281167, "num_ref_pr": 0, "reference_statistics": "statistics file",
           "fid_method": "sqrtm", "ref": "stats.npz", "samples": "s.npz", "inputs": {}, "sample_record": None}
    (tmp_path / "old.json").write_text(json.dumps(old))
    md, table = report.report([str(tmp_path / "old.json")])
    header, _, row = md.splitlines()[:3]
    titles = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(titles, (c.strip() for c in row.strip("|").split("|"))))
    assert (cells["N"], cells["FID"], cells["IS"], cells["Prec."], cells["SWD×10³"]) == ("50000", "12.35", "101.25",
                                                                                         "", "41.25")
    assert "12.3456" in table
