"""The objective of a training run from its config: the one place that maps the objective keys
(`stage_weights`, `stage_sampling`, `time_distribution`, `path_type`, `earlier_stage_loc`,
`earlier_stage_scale`, `proj_coeff`, `stage_time_shift`) onto `dfm.FlowMatchingObjective`.

The decomposition and its stage scales are not among them: the objective takes them from the
model it trains (`model.decomposition`), so training, sampling and calibration cannot disagree.
Training, the benchmarks and the tests all build their objective here.
"""
from __future__ import annotations

from dfm import STAGE_SAMPLING, TIME_DISTRIBUTIONS, FlowMatchingObjective, default_stage_weights, validate_stage_weights
from dfm.paths import PATH_TYPES
from training.errors import ConfigError


def check_objective_keys(cfg) -> None:
    """Fill `stage_weights` (null -> the default of S stages) and store `time_distribution` in its
    compact form; ConfigError naming the key for a bad value (the objective is built once)."""
    S = cfg.stages
    if cfg.stage_weights is None:
        cfg.stage_weights = default_stage_weights(S)
    try:
        cfg.stage_weights = validate_stage_weights(list(cfg.stage_weights), S)
    except ValueError as e:
        raise ConfigError(f"stage_weights: {e}") from None
    for key, allowed in (("stage_sampling", STAGE_SAMPLING), ("path_type", PATH_TYPES)):
        if cfg[key] not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {cfg[key]!r}")
    if not cfg.earlier_stage_scale > 0:
        raise ConfigError(f"earlier_stage_scale must be > 0, got {cfg.earlier_stage_scale}")
    try:
        cfg.time_distribution = TIME_DISTRIBUTIONS.compact(cfg.time_distribution)
    except ValueError as e:
        raise ConfigError(f"time_distribution (weighting): {e}") from None
    build_objective(cfg)


def build_objective(cfg) -> FlowMatchingObjective:
    """The S-stage flow-matching objective of a resolved training config."""
    try:
        return FlowMatchingObjective(
            cfg.stages, stage_weights=list(cfg.stage_weights), stage_sampling=cfg.stage_sampling,
            time_distribution=cfg.time_distribution, path_type=cfg.path_type,
            earlier_stage_loc=cfg.earlier_stage_loc, earlier_stage_scale=cfg.earlier_stage_scale,
            proj_coeff=cfg.proj_coeff, stage_time_shift=cfg.stage_time_shift)
    except ValueError as e:
        raise ConfigError(f"time_distribution (weighting): {e}" if "time distribution" in str(e) else str(e)) from None
