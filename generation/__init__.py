"""Sampling from SiT / DFM-SiT checkpoints: config, per-sample randomness, sharded resumable runs."""

from .config import GenerateConfig, GenerationError, resolve_config, validate_config
from .labels import class_labels
from .noise import derive_seed, initial_noise, sde_generators

__all__ = ["GenerateConfig", "GenerationError", "resolve_config", "validate_config", "class_labels",
           "derive_seed", "initial_noise", "sde_generators", "run"]


def run(cfg):
    """See generation.runner.run (imported lazily: it pulls in the models and samplers)."""
    from .runner import run as _run
    return _run(cfg)
