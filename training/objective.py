"""The objective of a training run from its config: the one place that maps the objective keys
(`stage_weights`, `stage_sampling`, `time_distribution`, `earlier_stage_loc`,
`earlier_stage_scale`, `proj_coeff`, `stage_time_shift`) onto `dfm.FlowMatchingObjective`.

The decomposition and its stage scales, the probability path and the prediction target are not
among them: they are options of the model (`path_type`, `prediction`, `decomposition` in its
arch), and the objective takes them from the model it trains, so training, sampling and
calibration cannot disagree. Training, the benchmarks and the tests all build their objective here.
"""
from __future__ import annotations

from dfm import (PATHS, STAGE_SAMPLING, TIME_DISTRIBUTIONS, FlowMatchingObjective, default_stage_weights,
                 validate_stage_weights)
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
    if cfg.stage_sampling not in STAGE_SAMPLING:
        raise ConfigError(f"stage_sampling must be one of {list(STAGE_SAMPLING)}, got {cfg.stage_sampling!r}")
    if not cfg.earlier_stage_scale > 0:
        raise ConfigError(f"earlier_stage_scale must be > 0, got {cfg.earlier_stage_scale}")
    try:
        cfg.time_distribution = TIME_DISTRIBUTIONS.compact(cfg.time_distribution)
        TIME_DISTRIBUTIONS.build(cfg.time_distribution, path=PATHS.build(cfg.path_type))  # on the run's path
    except ValueError as e:
        raise ConfigError(f"time_distribution (weighting): {e}") from None
    build_objective(cfg)


def build_objective(cfg) -> FlowMatchingObjective:
    """The S-stage flow-matching objective of a resolved training config."""
    try:
        return FlowMatchingObjective(
            cfg.stages, stage_weights=list(cfg.stage_weights), stage_sampling=cfg.stage_sampling,
            time_distribution=cfg.time_distribution,
            earlier_stage_loc=cfg.earlier_stage_loc, earlier_stage_scale=cfg.earlier_stage_scale,
            proj_coeff=cfg.proj_coeff, stage_time_shift=cfg.stage_time_shift)
    except ValueError as e:
        raise ConfigError(f"time_distribution (weighting): {e}" if "time distribution" in str(e) else str(e)) from None
