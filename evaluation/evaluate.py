"""``python -m evaluation.evaluate REF.npz SAMPLES.npz [--metrics fid,sfid,is,pr,fdd,swd,...]``: the
registered metrics (``evaluation.scores``; default ADM's FID, sFID, IS, precision/recall) of a
sample batch against a reference, in PyTorch, with the definitions of the ADM evaluation suite.

``REF.npz`` is a reference batch (``arr_0``, optionally ADM's stored ``mu/sigma/mu_s/sigma_s``)
or a statistics file of ``python -m evaluation.ref_stats``; with statistics, precision and
recall are not computed (they need the reference images' features) and are reported as null.
Only the networks the chosen metrics need are loaded: ``--metrics swd`` needs no weights file.

The result also says what was compared (:func:`input_provenance`): the sha256 and image count of
both files, the feature weights files' sha256, and the provenance record generate.py wrote beside
the samples (``SAMPLES.provenance.json``; null when there is none). Samples whose record says
their run is incomplete, or names another file, are refused before any feature is extracted.
``python -m evaluation.report`` turns results into a table.

See docs/EVALUATION.md for the weights to download and how close the numbers are to
ADM's TensorFlow evaluator.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from utils.atomic import atomic_write, reported_write_errors
from utils.checksum import file_sha256
from utils.threads import CPU_THREADS_HELP, cpu_threads_arg, using_cpu_threads

from .fdd import DEFAULT_DINOV2_MODEL
from .features import FeatureNetworks, NetworkOptions
from .inception import INCEPTION_WEIGHTS_FILENAME, strict_fp32
from .metric_base import Batches, Metric, check_inputs, needed_kinds, require_images, score_all, stream
from .npz import EvaluationError, InputError, NpzImageBatch, check_same_resolution, read_reference_statistics
from .scores import METRICS, build_metrics
from .stats_file import ReferenceStatistics, check_compatible, is_statistics_file, load_statistics, weights_identity

DEFAULT_METRICS = ("fid", "sfid", "is", "pr")
DEFAULT_NUM_REF_PR = 10000
DEFAULT_SWD_IMAGES = 10000
SAMPLES = "the samples' statistics"
# options of the command line before metrics were a registry: flag -> (metric, parameter)
LEGACY_FLAGS = {"--num-ref-pr": ("pr", "num_ref")}
# metric parameters set by one option for every metric that takes them
SHARED_PARAMETERS = ("method",)


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device}: not a torch device (use cuda, cuda:N or cpu)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return resolved


def _short(digest) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) else str(digest)


def input_provenance(ref_path: str, num_ref: int, sample_path: str, num_samples: int,
                     inception_weights: Optional[str], dinov2_weights: Optional[str]) -> Dict[str, object]:
    """``{"inputs": ..., "sample_record": ...}`` for a result: the sha256 and image count of both files, the
    identity (file, sha256, bytes) of the feature weights files (null for one not used, or not a file), and the
    provenance record generate.py wrote beside the samples (null when there is none: ADM's and foreign ``.npz``).

    Refuses (InputError) samples whose record says the run that made them is incomplete, or whose record
    holds another sha256 than the file (it was replaced after the record was written).
    """
    from generation.provenance import read_record

    try:
        record_file, record = read_record(sample_path)
    except ValueError as exc:
        raise InputError(f"sample batch {sample_path}: {exc}") from None
    if record is not None and not record["complete"]:
        raise InputError(f"sample batch {sample_path}: its provenance record {record_file} says the run that made it "
                         "is incomplete (killed, or still running); rerun the same generate.py command to finish it")
    sample_sha256 = file_sha256(sample_path)
    if record is not None and record.get("npz_sha256") != sample_sha256:
        raise InputError(f"sample batch {sample_path} is not the file its provenance record {record_file} describes "
                         f"(sha256 {_short(sample_sha256)}, recorded {_short(record.get('npz_sha256'))}): it was "
                         "replaced after the run; regenerate it, or delete the record to evaluate it as a foreign file")

    def identity(path: Optional[str]) -> Optional[Dict[str, object]]:
        return weights_identity(path) if path is not None and os.path.isfile(path) else None

    return {"inputs": {"samples": {"path": str(sample_path), "sha256": sample_sha256, "num_images": num_samples},
                       "ref": {"path": str(ref_path), "sha256": file_sha256(ref_path), "num_images": num_ref},
                       "inception_weights": identity(inception_weights), "dinov2_weights": identity(dinov2_weights)},
            "sample_record": record}


def _npz_batches(batch: NpzImageBatch, batch_size: int) -> Batches:
    """``metric_base.stream``'s batches of an ``.npz``: a fresh read of the first ``limit`` images per pass."""
    def batches(limit: Optional[int]):
        start = 0
        for images in batch.iter_batches(batch_size, limit=limit):
            yield np.arange(start, start + len(images)), images
            start += len(images)
    return batches


@dataclass
class Reference:
    """The first argument of ``evaluate``: a reference batch (``images``; ``arrays`` = ADM's stored
    statistics or empty) or a statistics file (``arrays`` and ``meta``; no images)."""

    path: str
    count: int
    arrays: Dict[str, np.ndarray]
    meta: Optional[Dict[str, object]] = None
    images: Optional[NpzImageBatch] = None
    stats: Optional[ReferenceStatistics] = None


def _not_a_folder(path: str, role: str, metrics: Sequence[Metric]) -> None:
    if not os.path.isdir(path):
        return
    if role == "samples":
        raise InputError(f"sample batch {path} is a folder; pass the .npz of samples (arr_0 = uint8 [N, H, W, 3]) "
                         "that generate.py writes")
    storable = ",".join(m.name for m in metrics if m.stores) or "fid,sfid"
    raise InputError(f"reference {path} is a folder (a dataset?); evaluate compares with a reference batch .npz "
                     f"(arr_0) or with the statistics file of a dataset, made once by: python -m evaluation.ref_stats "
                     f"{path} --out {os.path.normpath(path)}_stats.npz --metrics {storable}")


def open_reference(path: str, metrics: Sequence[Metric] = ()) -> Reference:
    """A :class:`Reference` of ``path``; InputError (one line) for a file that is neither kind."""
    _not_a_folder(path, "reference", metrics)
    if is_statistics_file(path):
        stats = load_statistics(path)
        return Reference(path, int(stats.meta["num_images"]), stats.arrays, stats.meta, stats=stats)
    images = NpzImageBatch(path)
    return Reference(path, len(images), read_reference_statistics(path) or {}, images=images)


def choose_metrics(metrics=None, *, fdd: bool = False, swd: bool = False, fid_method: str = "sqrtm",
                   options: Optional[Dict[str, Dict[str, object]]] = None) -> List[Metric]:
    """The metrics of ``evaluate``: ``metrics`` (a comma-separated string, or names / specs; default the
    ADM set); ``fdd`` / ``swd`` add those; ``options`` = ``{metric: {parameter: value}}`` for the metrics
    given by name; ``fid_method`` is the ``method`` of every metric that takes one."""
    if metrics is None:
        metrics = list(DEFAULT_METRICS)
    elif isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    specs = list(metrics)
    named = {spec if isinstance(spec, str) else dict(spec).get("name") for spec in specs}
    specs += [name for name, wanted in (("fdd", fdd), ("swd", swd)) if wanted and name not in named]
    options = options or {}
    specs = [{"name": spec, **options[spec]} if isinstance(spec, str) and spec in options else spec for spec in specs]
    return build_metrics(specs, {"method": fid_method})


def evaluate(ref_path: str, sample_path: str, *, metrics=None, inception_weights: Optional[str] = None,
             device: Optional[str] = None, batch_size: int = 64, num_ref_pr: Optional[int] = DEFAULT_NUM_REF_PR,
             fdd: bool = False, dinov2_weights: Optional[str] = None, dinov2_model: str = DEFAULT_DINOV2_MODEL,
             fid_method: str = "sqrtm", allow_resolution_mismatch: bool = False, swd: bool = False,
             swd_num_images: int = DEFAULT_SWD_IMAGES, swd_seed: int = 0,
             metric_options: Optional[Dict[str, Dict[str, object]]] = None,
             progress: bool = True) -> Dict[str, object]:
    """The ``metrics`` (default: FID, sFID, IS, precision/recall; ``fdd``, ``swd`` add those) of
    ``sample_path`` against ``ref_path``, as a dict.

    ``ref_path`` is a reference batch (``arr_0``; ADM's stored ``mu/sigma/mu_s/sigma_s`` of either
    file are used when present, as ADM does) or a statistics file of ``evaluation.ref_stats``; a
    metric a statistics file can never hold (precision/recall) is null then, with the reason under
    ``"not_computed"``. Inputs and weights are checked before any network runs, and only the
    networks the metrics need are loaded. Every set is streamed batch by batch. ``num_ref_pr``,
    ``swd_num_images``, ``swd_seed``: parameters of ``pr`` and ``swd``; ``metric_options`` sets any
    metric's parameters (``{"kid": {"subsets": 50}}``).
    """
    if fid_method not in ("sqrtm", "eigh"):
        raise InputError(f"--fid-method {fid_method}: use sqrtm (ADM) or eigh")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    options = {"pr": {"num_ref": 0 if num_ref_pr is None else num_ref_pr},
               "swd": {"seed": swd_seed, "num_images": swd_num_images}}
    for name, params in (metric_options or {}).items():
        options[name] = {**options.get(name, {}), **params}
    try:
        chosen = choose_metrics(metrics, fdd=fdd, swd=swd, fid_method=fid_method, options=options)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    _not_a_folder(sample_path, "samples", chosen)
    ref = open_reference(ref_path, chosen)
    samples = NpzImageBatch(sample_path)
    resolution = samples.info.resolution
    if ref.images is not None:
        check_same_resolution(ref.images.info, samples.info, allow_resolution_mismatch)
    # what a statistics file can never hold (precision/recall) is reported as null, with the reason
    skipped = [m for m in chosen if ref.stats is not None and m.uses_reference and not m.stores]
    scored = [m for m in chosen if m not in skipped]
    check_inputs(f"sample batch {sample_path}", len(samples), resolution, scored)
    # ADM's stored statistics of either batch stand in for its features, as in ADM
    stored_samples = read_reference_statistics(sample_path) or {}
    sample_data = {m.name: m.reference_from_file(stored_samples, None, sample_path) for m in scored}
    reference_data: Dict[str, object] = {}
    if ref.stats is None:
        for m in scored:
            data = m.reference_from_file(ref.arrays, None, ref_path) if m.uses_reference else None
            if data is not None:
                reference_data[m.name] = data
            elif m.uses_reference:
                limit = m.limit("reference")
                used = len(ref.images) if limit is None else min(limit, len(ref.images))
                where = f"reference batch {ref_path}" + (f" (first {used} used for {m.name})"
                                                         if used < len(ref.images) else "")
                require_images(where, used, [m])
    computed = [m for m in scored if m.uses_reference and m.name not in reference_data]
    kinds = needed_kinds([m for m in scored if sample_data[m.name] is None] + ([] if ref.stats else computed))
    torch_device = _resolve_device(device)
    networks = FeatureNetworks(kinds, NetworkOptions(inception_weights, dinov2_model, dinov2_weights), torch_device)
    if ref.stats is not None:
        check_compatible(ref.stats, scored, resolution, networks.paths.get("inception"), dinov2_model,
                         networks.paths.get("dinov2"))
        reference_data = {m.name: m.reference_from_file(ref.arrays, ref.meta, f"reference statistics {ref_path}")
                          for m in computed}
        computed = []
    provenance = input_provenance(ref_path, ref.count, sample_path, len(samples), networks.paths.get("inception"),
                                  networks.paths.get("dinov2"))
    for m in scored:
        m.device = torch_device

    with strict_fp32():
        networks.build()
        if computed:
            done = stream({m.name: m.accumulator("reference") for m in computed},
                          _npz_batches(ref.images, batch_size), networks, progress=progress, desc="reference",
                          total=len(ref.images))
            reference_data.update({name: acc.result() for name, acc in done.items()})
        done = stream({m.name: m.accumulator("samples") for m in scored if sample_data[m.name] is None},
                      _npz_batches(samples, batch_size), networks, progress=progress, desc="samples",
                      total=len(samples))
        sample_data.update({name: acc.result() for name, acc in done.items()})
        names = (f"{SAMPLES} ({sample_path})", f"the statistics of {ref_path}")
        results: Dict[str, object] = score_all(scored, sample_data, reference_data, names=names, progress=progress)
    for m in skipped:
        results.update({key: None for key in m.result_keys()})
        results.setdefault("not_computed", {}).update(
            {key: f"not computed: the reference is a statistics file, and {m.not_storable}; pass a reference "
                  "batch with arr_0 to get them" for key in m.result_keys()})
    if "dinov2" in networks.paths:
        results["dinov2_model"] = dinov2_model
    if any(hasattr(m, "method") for m in scored):
        results["fid_method"] = fid_method
    results.update({
        "metrics": [m.name for m in chosen],
        "num_samples": len(samples),
        "num_ref": ref.count,
        "reference_statistics": ("statistics file" if ref.stats is not None else
                                 "stored" if any(m.uses_reference and m not in computed for m in scored) else
                                 "computed"),
        "ref": str(ref_path),
        "samples": str(sample_path),
        **provenance,
    })
    return results


def write_json_atomic(obj: Dict[str, object], path: str) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _metric_flags() -> List[tuple]:
    """``(flag, metric, parameter, default)`` of every registered metric's parameters: ``--swd-seed``,
    ``--kid-subsets``, ... (the Fréchet distances' ``method`` is ``--fid-method``, for all of them)."""
    flags = []
    for name in METRICS.names():
        for param, default in METRICS.params(name).items():
            if param in SHARED_PARAMETERS:
                continue
            legacy = [flag for flag, target in LEGACY_FLAGS.items() if target == (name, param)]
            flags.append(([f"--{name}-{param}".replace("_", "-")] + legacy, name, param, default))
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.evaluate",
        description="Metrics of an ADM-style sample batch (uint8 [N, H, W, 3] in arr_0) against a reference "
                    "batch or a statistics file: FID, sFID, Inception Score, precision and recall as the ADM suite "
                    "defines them, and any registered metric (--metrics).")
    parser.add_argument("ref_batch", help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or a "
                                          "statistics file from python -m evaluation.ref_stats")
    parser.add_argument("sample_batch", help="sample batch .npz with arr_0 = uint8 [N, H, W, 3]")
    parser.add_argument("--metrics", default=None, metavar="LIST",
                        help=f"comma-separated metrics (default {','.join(DEFAULT_METRICS)}); registered: "
                             f"{','.join(METRICS.names())}")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help=f"torch-fidelity's {INCEPTION_WEIGHTS_FILENAME} (default: torch.hub cache, else "
                             "download from GitHub); only read when a metric needs Inception")
    parser.add_argument("--fdd", action="store_true", help="also compute FDD (same as adding fdd to --metrics)")
    parser.add_argument("--dinov2-weights", default=None, metavar="PATH",
                        help="DINOv2 weights (timm model.safetensors or Meta's dinov2_vitl14_pretrain.pth)")
    parser.add_argument("--dinov2-model", default=DEFAULT_DINOV2_MODEL, help=f"timm model name (default {DEFAULT_DINOV2_MODEL})")
    parser.add_argument("--fid-method", default="sqrtm", choices=("sqrtm", "eigh"),
                        help="matrix square root of every Fréchet distance (FID, sFID, FDD): sqrtm (ADM, default) "
                             "or eigh (faster)")
    parser.add_argument("--swd", action="store_true",
                        help="also compute SWD (same as adding swd to --metrics; needs no weights)")
    group = parser.add_argument_group("metric parameters (used when the metric is computed)")
    for flags, name, param, default in _metric_flags():
        kind = type(default) if default is not None and default is not inspect.Parameter.empty else str
        group.add_argument(*flags, dest=f"metric:{name}:{param}", type=kind, default=None, metavar=param.upper(),
                           help=f"{name}'s {param} (default {default})")
    parser.add_argument("--allow-resolution-mismatch", action="store_true",
                        help="compare samples and a reference batch of different image sizes")
    parser.add_argument("--out", default=None, metavar="JSON", help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--cpu-threads", type=cpu_threads_arg, default=None, help=CPU_THREADS_HELP)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    options: Dict[str, Dict[str, object]] = {}
    for dest, value in vars(args).items():
        if dest.startswith("metric:") and value is not None:
            _, name, param = dest.split(":")
            options.setdefault(name, {})[param] = value
    try:
        with using_cpu_threads(args.cpu_threads):
            results = evaluate(
                args.ref_batch, args.sample_batch, metrics=args.metrics, inception_weights=args.inception_weights,
                device=args.device, batch_size=args.batch_size, fdd=args.fdd, dinov2_weights=args.dinov2_weights,
                dinov2_model=args.dinov2_model, fid_method=args.fid_method,
                allow_resolution_mismatch=args.allow_resolution_mismatch, swd=args.swd, metric_options=options,
                progress=not args.no_progress)
        for name, reason in results.get("not_computed", {}).items():
            print(f"note: {name} {reason}", file=sys.stderr)
        if args.out:
            with reported_write_errors(args.out, EvaluationError):
                write_json_atomic(results, args.out)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
