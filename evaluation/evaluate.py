"""``python -m evaluation.evaluate REF.npz SAMPLES.npz``: FID, sFID, IS, precision, recall
(and FDD with ``--fdd``) with the definitions of the ADM evaluation suite, in PyTorch.

See docs/EVALUATION.md for the weights to download and how close the numbers are to
ADM's TensorFlow evaluator.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from utils.progress import progress_bar

from utils.atomic import atomic_write

from .fdd import DEFAULT_DINOV2_MODEL, DinoV2FeatureExtractor, load_dinov2, resolve_dinov2_weights
from .inception import InceptionFeatureExtractor, resolve_inception_weights, strict_fp32
from .metrics import PR_NEIGHBOURHOOD, feature_statistics, frechet_distance, inception_score, precision_recall
from .npz import EvaluationError, InputError, NpzImageBatch, check_same_resolution, read_reference_statistics

DEFAULT_NUM_REF_PR = 10000


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


def evaluate(ref_path: str, sample_path: str, *, inception_weights: Optional[str] = None,
             device: Optional[str] = None, batch_size: int = 64, num_ref_pr: Optional[int] = DEFAULT_NUM_REF_PR,
             fdd: bool = False, dinov2_weights: Optional[str] = None, dinov2_model: str = DEFAULT_DINOV2_MODEL,
             fid_method: str = "sqrtm", allow_resolution_mismatch: bool = False,
             progress: bool = True) -> Dict[str, object]:
    """All metrics of ``sample_path`` against the reference batch ``ref_path``, as a dict.

    Inputs are checked (and weights located) before any network runs. FID/sFID use the
    stored ``mu/sigma/mu_s/sigma_s`` of either file when present, as ADM does; precision and
    recall use the first ``num_ref_pr`` reference images (None or 0: all, ADM's choice; the
    ImageNet reference batches hold exactly 10000).
    """
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
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    if fid_method not in ("sqrtm", "eigh"):
        raise InputError(f"--fid-method {fid_method}: use sqrtm (ADM) or eigh")
    torch_device = _resolve_device(device)
    weights_path = resolve_inception_weights(inception_weights)
    dinov2_path = resolve_dinov2_weights(dinov2_model, dinov2_weights) if fdd else None

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
        results: Dict[str, object] = {
            "fid": frechet_distance(*smp_pool, *ref_pool, method=fid_method),
            "sfid": frechet_distance(*smp_spatial, *ref_spatial, method=fid_method),
            "inception_score": inception_score(smp_feats["logits"]),
        }
        results["precision"], results["recall"] = precision_recall(
            ref_feats["pool"][:n_ref_pr], smp_feats["pool"], device=torch_device)

        if fdd:
            dino = DinoV2FeatureExtractor(load_dinov2(dinov2_model, dinov2_path, torch_device))
            ref_dino = extract_features(ref, dino, batch_size, desc="reference (DINOv2)", progress=progress)
            smp_dino = extract_features(samples, dino, batch_size, desc="samples (DINOv2)", progress=progress)
            results["fdd"] = frechet_distance(*feature_statistics(smp_dino["features"]),
                                              *feature_statistics(ref_dino["features"]), method=fid_method)
            results["dinov2_model"] = dinov2_model

    results.update({
        "num_samples": len(samples),
        "num_ref": len(ref),
        "num_ref_pr": n_ref_pr,
        "reference_statistics": "stored" if ref_stats is not None else "computed",
        "fid_method": fid_method,
        "ref": str(ref_path),
        "samples": str(sample_path),
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
    parser.add_argument("ref_batch", help="reference batch .npz (e.g. VIRTUAL_imagenet256_labeled.npz)")
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
    parser.add_argument("--allow-resolution-mismatch", action="store_true",
                        help="compare samples and a reference batch of different image sizes")
    parser.add_argument("--out", default=None, metavar="JSON", help="also write the results to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = evaluate(
            args.ref_batch, args.sample_batch, inception_weights=args.inception_weights, device=args.device,
            batch_size=args.batch_size, num_ref_pr=args.num_ref_pr, fdd=args.fdd,
            dinov2_weights=args.dinov2_weights, dinov2_model=args.dinov2_model, fid_method=args.fid_method,
            allow_resolution_mismatch=args.allow_resolution_mismatch, progress=not args.no_progress)
        if args.out:
            write_json_atomic(results, args.out)
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
