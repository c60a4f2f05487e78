"""Class labels of the samples, as a pure function of (seed, sample index)."""

from __future__ import annotations

import warnings

import torch

from .noise import derive_seed

LABEL_MODES = ("random", "balanced")


def class_labels(num_samples: int, num_classes: int, seed: int, mode: str = "balanced") -> torch.Tensor:
    """Labels of samples 0 .. num_samples-1, shape (N,) int64.

    balanced: `arange(N) % num_classes` shuffled by a permutation seeded by `seed`, so every
        class appears exactly N / num_classes times when num_classes divides N (otherwise the
        counts differ by at most one, with a warning). Label i depends on (seed, i, N).
    random: label i is drawn uniformly from its own (seed, i) hash; it does not depend on N.
    """
    if num_samples < 1 or num_classes < 1:
        raise ValueError(f"num_samples ({num_samples}) and num_classes ({num_classes}) must be >= 1")
    if mode == "balanced":
        if num_samples % num_classes:
            warnings.warn(
                f"labels=balanced: num_samples={num_samples} is not a multiple of num_classes="
                f"{num_classes}; class counts will differ by one", stacklevel=2)
        gen = torch.Generator().manual_seed(derive_seed(seed, num_samples, "label-permutation"))
        permutation = torch.randperm(num_samples, generator=gen)
        return (torch.arange(num_samples) % num_classes)[permutation]
    if mode == "random":
        # A 63-bit hash modulo num_classes: bias below 1e-15, and no dependence on N.
        return torch.tensor([derive_seed(seed, i, "label") % num_classes for i in range(num_samples)],
                            dtype=torch.long)
    raise ValueError(f"labels must be one of {LABEL_MODES}, got {mode!r}")
