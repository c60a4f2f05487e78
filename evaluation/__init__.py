"""ADM-suite evaluation in PyTorch: FID, sFID, IS, precision/recall, FDD, SWD and any registered metric (SPEC §7).

Command line: ``python -m evaluation.evaluate REF.npz SAMPLES.npz [--metrics ...]`` (see docs/EVALUATION.md).
Submodules: ``metric_base`` (the ``METRICS`` registry, the metric contract, streaming accumulators),
``scores`` (the registered metrics), ``features`` (the feature kinds metrics need and the networks
behind them), ``npz`` (reading/validating batches), ``metrics`` (the formulas), ``inception``
(Inception-v3 2015 features), ``fdd`` (DINOv2 features), ``swd`` (streamed SWD), ``evaluate`` (the pipeline and CLI;
``evaluation.evaluate.evaluate(ref, samples, ...)`` returns the metrics as a dict, with the inputs'
sha256 and the samples' generate.py provenance record), ``report`` (``python -m evaluation.report
RESULT.json ...``: results as the papers' table, each row's provenance under it).
"""
import importlib

# names of the package, imported when first used: `import evaluation.X` (training imports the metric
# registry to check its keys) then costs no scipy and no formulas it does not use
_LAZY = {"feature_statistics": "metrics", "frechet_distance": "metrics", "inception_score": "metrics",
         "manifold_radii": "metrics", "precision_recall": "metrics", "EvaluationError": "npz",
         "InputError": "npz", "NpzImageBatch": "npz", "read_reference_statistics": "npz"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EvaluationError",
    "InputError",
    "NpzImageBatch",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "manifold_radii",
    "precision_recall",
    "read_reference_statistics",
]
