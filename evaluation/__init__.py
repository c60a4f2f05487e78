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
from .metrics import feature_statistics, frechet_distance, inception_score, manifold_radii, precision_recall
from .npz import EvaluationError, InputError, NpzImageBatch, read_reference_statistics

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
