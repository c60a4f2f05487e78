"""``python -m evaluation.evaluate REF.npz SAMPLES.npz``: FID, sFID, IS, precision, recall
(FDD with ``--fdd``, SWD with ``--swd``) with the definitions of the ADM evaluation suite, in PyTorch.

``REF.npz`` is a reference batch (``arr_0``, optionally ADM's stored ``mu/sigma/mu_s/sigma_s``)
or a statistics file of ``python -m evaluation.ref_stats``; with statistics, precision and
recall are not computed (they need the reference images' features) and are reported as null.

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
import json
import os
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from utils.progress import progress_bar

from utils.atomic import atomic_write, reported_write_errors
from utils.checksum import file_sha256
from utils.threads import CPU_THREADS_HELP, cpu_threads_arg, using_cpu_threads

from .fdd import DEFAULT_DINOV2_MODEL, DinoV2FeatureExtractor, load_dinov2, resolve_dinov2_weights
from .inception import InceptionFeatureExtractor, resolve_inception_weights, strict_fp32
from .metrics import PR_NEIGHBOURHOOD, feature_statistics, frechet_distance, inception_score, precision_recall
from .npz import EvaluationError, InputError, NpzImageBatch, check_same_resolution, read_reference_statistics
from .online import SAMPLES, frechet_scores
from .stats_file import check_compatible, is_statistics_file, load_statistics, weights_identity
from .swd import swd as sliced_wasserstein

DEFAULT_NUM_REF_PR = 10000
DEFAULT_SWD_IMAGES = 10000
PR_NEEDS_IMAGES = ("not computed: the reference is a statistics file, and precision/recall need the "
                   "reference images' features; pass a reference batch with arr_0 to get them")


def extract_features(images: NpzImageBatch, extractor: Callable[[np.ndarray], object], batch_size: int,
                     limit: Optional[int] = None, desc: str = "", progress: bool = True) -> Dict[str, np.ndarray]:
    """Run ``extractor`` over the first ``limit`` images (all if None), in file order.

    ``extractor`` returns either an array or a dict of arrays per batch; the result is a
    dict of the concatenated arrays (key ``"features"`` for a plain array).
    """
    total = len(images) if limit is None else min(limit, len(images))
    parts: Dict[str, List[np.ndarray]] = {}
    with progress_bar(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in images.iter_batches(batch_size, limit=total):
            out = extractor(batch)
            for key, value in (out.items() if isinstance(out, dict) else [("features", out)]):
                parts.setdefault(key, []).append(value)
            bar.update(len(batch))
    return {key: np.concatenate(values, axis=0) for key, values in parts.items()}


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


def _check_options_and_weights(batch_size: int, fid_method: str, device: Optional[str],
                               inception_weights: Optional[str], fdd: bool, dinov2_model: str,
                               dinov2_weights: Optional[str]):
    """Validate the shared options; returns the torch device and the local weights files."""
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if fid_method not in ("sqrtm", "eigh"):
        raise InputError(f"--fid-method {fid_method}: use sqrtm (ADM) or eigh")
    dinov2_path = resolve_dinov2_weights(dinov2_model, dinov2_weights) if fdd else None
    return _resolve_device(device), resolve_inception_weights(inception_weights), dinov2_path


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


def _load_images(batch: NpzImageBatch, limit: int) -> np.ndarray:
    return np.concatenate(list(batch.iter_batches(1024, limit=limit)))


def _swd_results(samples: NpzImageBatch, reference: np.ndarray, num_images: int, seed: int) -> Dict[str, float]:
    """SWD of the first ``num_images`` samples against (at most ``num_images``) reference images."""
    return sliced_wasserstein(_load_images(samples, num_images), reference[:num_images], seed=seed).as_dict()


def evaluate(ref_path: str, sample_path: str, *, inception_weights: Optional[str] = None,
             device: Optional[str] = None, batch_size: int = 64, num_ref_pr: Optional[int] = DEFAULT_NUM_REF_PR,
             fdd: bool = False, dinov2_weights: Optional[str] = None, dinov2_model: str = DEFAULT_DINOV2_MODEL,
             fid_method: str = "sqrtm", allow_resolution_mismatch: bool = False, swd: bool = False,
             swd_num_images: int = DEFAULT_SWD_IMAGES, swd_seed: int = 0,
             progress: bool = True) -> Dict[str, object]:
    """All metrics of ``sample_path`` against the reference batch ``ref_path``, as a dict.

    Inputs are checked (and weights located) before any network runs. FID/sFID use the
    stored ``mu/sigma/mu_s/sigma_s`` of either file when present, as ADM does; precision and
    recall use the first ``num_ref_pr`` reference images (None or 0: all, ADM's choice; the
    ImageNet reference batches hold exactly 10000). ``ref_path`` may instead be a statistics
    file of ``evaluation.ref_stats`` (see :func:`evaluate_against_statistics`). ``swd``: SWD of
    the first ``swd_num_images`` samples against the first ``swd_num_images`` reference images.
    """
    if swd and swd_num_images < 1:
        raise InputError(f"--swd-num-images must be >= 1, got {swd_num_images}")
    if is_statistics_file(ref_path):
        return evaluate_against_statistics(
            ref_path, sample_path, inception_weights=inception_weights, device=device, batch_size=batch_size,
            fdd=fdd, dinov2_weights=dinov2_weights, dinov2_model=dinov2_model, fid_method=fid_method, swd=swd,
            swd_num_images=swd_num_images, swd_seed=swd_seed, progress=progress)
    ref, samples = NpzImageBatch(ref_path), NpzImageBatch(sample_path)
    check_same_resolution(ref.info, samples.info, allow_resolution_mismatch)
    ref_stats, sample_stats = read_reference_statistics(ref_path), read_reference_statistics(sample_path)
    if num_ref_pr is not None and num_ref_pr < 0:
        raise InputError(f"--num-ref-pr must be >= 0 (0 = all reference images), got {num_ref_pr}")
    n_ref_pr = len(ref) if not num_ref_pr else min(int(num_ref_pr), len(ref))
    min_images = PR_NEIGHBOURHOOD + 1
    for name, count in ((f"reference batch {ref_path} (first {n_ref_pr} used for precision/recall)", n_ref_pr),
                        (f"sample batch {sample_path}", len(samples))):
        if count < min_images:
            raise InputError(f"{name}: {count} images; precision/recall (k = {PR_NEIGHBOURHOOD}) and the "
                             f"covariances need at least {min_images}")
    torch_device, weights_path, dinov2_path = _check_options_and_weights(
        batch_size, fid_method, device, inception_weights, fdd, dinov2_model, dinov2_weights)
    provenance = input_provenance(ref_path, len(ref), sample_path, len(samples), weights_path, dinov2_path)

    with strict_fp32():
        inception = InceptionFeatureExtractor(weights_path, torch_device)
        # Without stored statistics the reference covariances need every reference image.
        ref_feats = extract_features(ref, inception, batch_size, limit=n_ref_pr if ref_stats is not None else None,
                                     desc="reference (Inception)", progress=progress)
        smp_feats = extract_features(samples, inception, batch_size, desc="samples (Inception)", progress=progress)
        del inception

        def stats(stored, feats):
            if stored is not None:
                return (stored["mu"], stored["sigma"]), (stored["mu_s"], stored["sigma_s"])
            return feature_statistics(feats["pool"]), feature_statistics(feats["spatial"])

        (ref_pool, ref_spatial), (smp_pool, smp_spatial) = stats(ref_stats, ref_feats), stats(sample_stats, smp_feats)
        names = (f"{SAMPLES} ({sample_path})", f"the statistics of {ref_path}")
        results: Dict[str, object] = {
            "fid": frechet_distance(*smp_pool, *ref_pool, method=fid_method, names=names),
            "sfid": frechet_distance(*smp_spatial, *ref_spatial, method=fid_method, names=names),
            "inception_score": inception_score(smp_feats["logits"]),
        }
        results["precision"], results["recall"] = precision_recall(
            ref_feats["pool"][:n_ref_pr], smp_feats["pool"], device=torch_device)

        if fdd:
            dino = DinoV2FeatureExtractor(load_dinov2(dinov2_model, dinov2_path, torch_device))
            ref_dino = extract_features(ref, dino, batch_size, desc="reference (DINOv2)", progress=progress)
            smp_dino = extract_features(samples, dino, batch_size, desc="samples (DINOv2)", progress=progress)
            results["fdd"] = frechet_distance(*feature_statistics(smp_dino["features"]),
                                              *feature_statistics(ref_dino["features"]), method=fid_method,
                                              names=names)
            results["dinov2_model"] = dinov2_model

    if swd:
        results.update(_swd_results(samples, _load_images(ref, swd_num_images), swd_num_images, swd_seed))
    results.update({
        "num_samples": len(samples),
        "num_ref": len(ref),
        "num_ref_pr": n_ref_pr,
        "reference_statistics": "stored" if ref_stats is not None else "computed",
        "fid_method": fid_method,
        "ref": str(ref_path),
        "samples": str(sample_path),
        **provenance,
    })
    return results


def evaluate_against_statistics(stats_path: str, sample_path: str, *, inception_weights: Optional[str] = None,
                                device: Optional[str] = None, batch_size: int = 64, fdd: bool = False,
                                dinov2_weights: Optional[str] = None, dinov2_model: str = DEFAULT_DINOV2_MODEL,
                                fid_method: str = "sqrtm", swd: bool = False,
                                swd_num_images: int = DEFAULT_SWD_IMAGES, swd_seed: int = 0,
                                progress: bool = True) -> Dict[str, object]:
    """FID, sFID, IS (and FDD, SWD) of ``sample_path`` against a statistics file.

    The statistics must be of the samples' resolution and of the same weights files
    (:func:`evaluation.stats_file.check_compatible`). Precision and recall are ``None`` with
    the reason under ``"not_computed"``; IS needs only the samples.
    """
    stats, samples = load_statistics(stats_path), NpzImageBatch(sample_path)
    metrics = ["fid", "sfid"] + (["fdd"] if fdd else []) + (["swd"] if swd else [])
    if len(samples) < 2:
        raise InputError(f"sample batch {sample_path}: {len(samples)} image(s); a covariance needs at least 2")
    torch_device, weights_path, dinov2_path = _check_options_and_weights(
        batch_size, fid_method, device, inception_weights, fdd, dinov2_model, dinov2_weights)
    check_compatible(stats, metrics, samples.info.resolution, weights_path, dinov2_model, dinov2_path)
    provenance = input_provenance(stats_path, stats.meta["num_images"], sample_path, len(samples), weights_path,
                                  dinov2_path)

    with strict_fp32():
        feats = extract_features(samples, InceptionFeatureExtractor(weights_path, torch_device), batch_size,
                                 desc="samples (Inception)", progress=progress)
        sample_stats = {"pool": feature_statistics(feats["pool"]), "spatial": feature_statistics(feats["spatial"])}
        if fdd:
            dino = DinoV2FeatureExtractor(load_dinov2(dinov2_model, dinov2_path, torch_device))
            dino_feats = extract_features(samples, dino, batch_size, desc="samples (DINOv2)", progress=progress)
            sample_stats["dinov2"] = feature_statistics(dino_feats["features"])
    results: Dict[str, object] = frechet_scores(stats, sample_stats, metrics, fid_method)
    results.update({"inception_score": inception_score(feats["logits"]), "precision": None, "recall": None,
                    "not_computed": {"precision": PR_NEEDS_IMAGES, "recall": PR_NEEDS_IMAGES}})
    if fdd:
        results["dinov2_model"] = dinov2_model
    if swd:
        results.update(_swd_results(samples, stats.arrays["swd_images"], swd_num_images, swd_seed))
    results.update({
        "num_samples": len(samples),
        "num_ref": stats.meta["num_images"],
        "num_ref_pr": 0,
        "reference_statistics": "statistics file",
        "fid_method": fid_method,
        "ref": str(stats_path),
        "samples": str(sample_path),
        **provenance,
    })
    return results


def write_json_atomic(obj: Dict[str, object], path: str) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.evaluate",
        description="FID, sFID, Inception Score, precision and recall of an ADM-style sample batch "
                    "(uint8 [N, H, W, 3] in arr_0) against a reference batch, as the ADM suite defines them.")
    parser.add_argument("ref_batch", help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz) or a "
                                          "statistics file from python -m evaluation.ref_stats")
    parser.add_argument("sample_batch", help="sample batch .npz with arr_0 = uint8 [N, H, W, 3]")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch.hub "
                             "cache, else download from GitHub)")
    parser.add_argument("--num-ref-pr", type=int, default=DEFAULT_NUM_REF_PR,
                        help="reference images used for precision/recall (default 10000; 0 = all, as ADM)")
    parser.add_argument("--fdd", action="store_true", help="also compute FDD (Fréchet distance of DINOv2 features)")
    parser.add_argument("--dinov2-weights", default=None, metavar="PATH",
                        help="DINOv2 weights (timm model.safetensors or Meta's dinov2_vitl14_pretrain.pth)")
    parser.add_argument("--dinov2-model", default=DEFAULT_DINOV2_MODEL, help=f"timm model name (default {DEFAULT_DINOV2_MODEL})")
    parser.add_argument("--fid-method", default="sqrtm", choices=("sqrtm", "eigh"),
                        help="matrix square root of the Fréchet distance: sqrtm (ADM, default) or eigh (faster)")
    parser.add_argument("--swd", action="store_true",
                        help="also compute SWD (ProGAN's sliced Wasserstein distance x1e3; needs no weights)")
    parser.add_argument("--swd-num-images", type=int, default=DEFAULT_SWD_IMAGES,
                        help=f"images of each set used for SWD (default {DEFAULT_SWD_IMAGES}; ~75 KB memory each)")
    parser.add_argument("--swd-seed", type=int, default=0, help="seed of SWD's patches and directions (default 0)")
    parser.add_argument("--allow-resolution-mismatch", action="store_true",
                        help="compare samples and a reference batch of different image sizes")
    parser.add_argument("--out", default=None, metavar="JSON", help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--cpu-threads", type=cpu_threads_arg, default=None, help=CPU_THREADS_HELP)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with using_cpu_threads(args.cpu_threads):
            results = evaluate(
                args.ref_batch, args.sample_batch, inception_weights=args.inception_weights, device=args.device,
                batch_size=args.batch_size, num_ref_pr=args.num_ref_pr, fdd=args.fdd,
                dinov2_weights=args.dinov2_weights, dinov2_model=args.dinov2_model, fid_method=args.fid_method,
                allow_resolution_mismatch=args.allow_resolution_mismatch, swd=args.swd,
                swd_num_images=args.swd_num_images, swd_seed=args.swd_seed, progress=not args.no_progress)
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
