"""The ADM-suite metrics on precomputed features (SPEC §7): Fréchet distance, Inception
Score, k-NN manifold precision/recall.

Definitions follow openai/guided-diffusion ``evaluations/evaluator.py``:

- statistics: ``mu = mean``, ``sigma = np.cov(rowvar=False)`` (ddof = 1), float64;
- Fréchet distance: ``|mu1 - mu2|^2 + tr(s1 + s2 - 2 sqrtm(s1 s2))`` with ``scipy.linalg.sqrtm``,
  the ``eps * I`` retry when the square root is not finite, and the imaginary-part check;
- Inception Score: softmax of the bias-free logits, consecutive splits of 5000 samples
  (10 splits for 50k), ``mean_split exp(E_x KL(p(y|x) || p(y)))``;
- precision/recall: squared L2 distances, radius of a point = distance to its k-th nearest
  neighbour (k = 3, the point itself counting as the 0th), ``<=`` tests, blocks of 10000,
  distances rounded through float16 like ADM's TensorFlow graph (see
  :func:`pairwise_squared_distances`).
"""
from __future__ import annotations

import warnings
from typing import Tuple

import numpy as np
import torch

from .npz import require_finite

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3
PR_BATCH_SIZE = 10000


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (ddof = 1) of ``(N, D)`` features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningStatistics:
    """Mean and covariance (ddof = 1) of features seen in batches, from float64 sums.

    ``update`` per batch, ``merge`` the partial sums of other processes (the object pickles),
    ``finalize`` gives what :func:`feature_statistics` gives on all features at once (up to
    float64 rounding), without keeping the features.
    """

    def __init__(self, dim: int):
        self.count = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> "RunningStatistics":
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.sum):
            raise ValueError(f"expected (N, {len(self.sum)}) features, got shape {x.shape}")
        self.count += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: "RunningStatistics") -> "RunningStatistics":
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def finalize(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """``tr sqrtm(sigma1 @ sigma2)`` exactly as ADM/TTUR compute it (Schur square root)."""
    from scipy import linalg  # here, not at the top: training imports this package and needs no scipy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"Fréchet distance: singular product; adding {eps} to the covariance diagonals")
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr sqrtm(sigma1 @ sigma2)`` via symmetric eigendecompositions (several times faster).

    With ``sigma1 = F F^T`` (``F`` = eigenvectors scaled by the root eigenvalues, numerically
    zero ones dropped), the non-zero eigenvalues of ``sigma1 sigma2`` are those of the
    symmetric PSD ``F^T sigma2 F``; the trace is the sum of their square roots. Dropping the
    null space also keeps rank-deficient covariances (N < D) exact and cheap.
    """
    w, v = np.linalg.eigh(sigma1)
    if w[-1] <= 0:
        return 0.0
    keep = w > w[-1] * len(w) * np.finfo(np.float64).eps
    factor = v[:, keep] * np.sqrt(w[keep])
    inner = factor.T @ sigma2 @ factor
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, method: str = "sqrtm",
                     names: Tuple[str, str] = ("the first statistics", "the second statistics")) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``method="sqrtm"`` is ADM's computation (scipy Schur ``sqrtm``; ~15 s for 2048-d on two
    cores); ``"eigh"`` gives the same value for PSD covariances in a fraction of the time
    (and an exact one where N < D makes the covariances singular). Non-finite statistics raise
    one :class:`InputError` naming them by ``names`` (e.g. the samples', a reference file).
    The value is clamped at 0 (float rounding makes the distance of a set to itself ~-1e-7).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Fréchet distance: mismatched statistics {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    require_finite(names[0], mu=mu1, sigma=sigma1)
    require_finite(names[1], mu=mu2, sigma=sigma2)
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ValueError(f"unknown Fréchet method {method!r}; use 'sqrtm' or 'eigh'")
    diff = mu1 - mu2
    # A distance is >= 0: rounding of a set against itself (or a near-identical one) can leave -1e-7.
    return max(0.0, float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score of ``(N, C)`` classifier logits, ADM's way.

    ``p(y|x) = softmax(logits)`` (for Inception: pool_3 times the 1008-way weights, without
    bias, all 1008 columns); consecutive splits of ``split_size`` (the last may be shorter);
    the score is the mean over splits of ``exp(mean_x KL(p(y|x) || mean_x p(y|x)))``.
    Computed in float64 with log-softmax, so no probability underflows to log(0).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"inception_score expects (N, C) logits, got shape {logits.shape}")
    from scipy.special import logsumexp

    log_p = logits - logsumexp(logits, axis=1, keepdims=True)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start:start + split_size]
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))
        kl = np.sum(np.exp(part) * (part - log_marginal[None]), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores))


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to float16 and back (round-to-nearest-even, overflow -> inf)."""
    return x.half().float()


def pairwise_squared_distances(u: torch.Tensor, v: torch.Tensor, emulate_fp16: bool = True) -> torch.Tensor:
    """Squared L2 distances ``(n_u, n_v)`` float32 as ``max(|u|^2 - 2 u.v + |v|^2, 0)``.

    With ``emulate_fp16`` every operation of ADM's TensorFlow block is rounded to float16
    (inputs, squares, row sums, matmul, the two additions), sums and products accumulated in
    float32 as cuBLAS/GPU reductions do; if any entry is not finite (float16 overflow) the
    block is recomputed in float32, as ADM's ``tf.cond`` does. Float16 spacing near 500 is
    0.25, so this rounding decides borderline ``<=`` tests and is kept on purpose.
    """
    u, v = u.float(), v.float()
    if emulate_fp16:
        u16, v16 = _f16(u), _f16(v)
        norm_u = _f16(_f16(u16 * u16).sum(1))
        norm_v = _f16(_f16(v16 * v16).sum(1))
        dot = _f16(u16 @ v16.T)
        dist = _f16(_f16(norm_u[:, None] - _f16(2 * dot)) + norm_v[None, :])
        if torch.isfinite(dist).all():
            return dist.clamp_min(0)
    dist = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]
    return dist.clamp_min(0)


def _to_tensor(x, device) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)


def manifold_radii(features, k: int = PR_NEIGHBOURHOOD, batch_size: int = PR_BATCH_SIZE,
                   emulate_fp16: bool = True, device: str | torch.device = "cpu") -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour, ``(N,)`` float32.

    The point itself is its own 0th neighbour (distance ~0), so k = 3 means the third
    other point, as in ADM (``np.partition(d, [0..k])[:, k]``).
    """
    x = _to_tensor(features, device)
    n = len(x)
    if n <= k:
        raise ValueError(f"precision/recall with k = {k} needs at least {k + 1} images per set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, batch_size):
        rows = x[r0:r0 + batch_size]
        best = None
        for c0 in range(0, n, batch_size):
            block = pairwise_squared_distances(rows, x[c0:c0 + batch_size], emulate_fp16)
            block = block if best is None else torch.cat([best, block], dim=1)
            best = torch.topk(block, k + 1, dim=1, largest=False, sorted=True).values
        radii[r0:r0 + batch_size] = best[:, k]
    return radii


def precision_recall(ref_features, sample_features, k: int = PR_NEIGHBOURHOOD,
                     batch_size: int = PR_BATCH_SIZE, emulate_fp16: bool = True,
                     device: str | torch.device = "cpu") -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them.

    precision = fraction of samples inside some reference ball, recall = fraction of
    references inside some sample ball; a ball is centred on a point with the squared
    distance to its k-th neighbour as radius, and "inside" is ``d <= radius``.
    """
    ref, smp = _to_tensor(ref_features, device), _to_tensor(sample_features, device)
    ref_radii = manifold_radii(ref, k, batch_size, emulate_fp16, device)
    smp_radii = manifold_radii(smp, k, batch_size, emulate_fp16, device)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    smp_in = torch.zeros(len(smp), dtype=torch.bool, device=ref.device)
    for r0 in range(0, len(ref), batch_size):
        ref_rows, ref_r = ref[r0:r0 + batch_size], ref_radii[r0:r0 + batch_size]
        for c0 in range(0, len(smp), batch_size):
            dist = pairwise_squared_distances(ref_rows, smp[c0:c0 + batch_size], emulate_fp16)
            ref_in[r0:r0 + batch_size] |= (dist <= smp_radii[None, c0:c0 + batch_size]).any(dim=1)
            smp_in[c0:c0 + batch_size] |= (dist <= ref_r[:, None]).any(dim=0)
    return float(smp_in.double().mean()), float(ref_in.double().mean())
