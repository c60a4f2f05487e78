"""Decomposable Flow Matching: multi-scale decompositions, timestep/stage sampling, the S-stage objective.

Plain flow matching (SiT) is the one-stage case of everything here. The extension points
(decompositions, time distributions, probability paths, prediction targets) are registries: see docs/EXTENDING.md.
"""
from dfm.decompositions import (DECOMPOSITIONS, Decomposition, LaplacianPyramid, check_stage_scales,
                                decomposition_of, down, up)
from dfm.paths import PATHS, Path, path_of
from dfm.predictions import PREDICTIONS, PredictionTarget, prediction_of
from dfm.timesteps import (TIME_DISTRIBUTIONS, TimeDistribution, generator_as_global,
                           sample_logit_normal, sample_timesteps)
from dfm.stages import sample_stages, default_stage_weights, validate_stage_weights, STAGE_SAMPLING
from dfm.objective import FlowMatchingObjective, projection_loss
from dfm.calibration import LevelEnergy, measure_stage_scales

__all__ = [
    "DECOMPOSITIONS", "Decomposition", "LaplacianPyramid", "check_stage_scales", "decomposition_of", "down", "up",
    "PATHS", "Path", "path_of", "PREDICTIONS", "PredictionTarget", "prediction_of",
    "TIME_DISTRIBUTIONS", "TimeDistribution", "generator_as_global",
    "sample_timesteps", "sample_logit_normal",
    "sample_stages", "default_stage_weights", "validate_stage_weights", "STAGE_SAMPLING",
    "FlowMatchingObjective", "projection_loss", "LevelEnergy", "measure_stage_scales",
]
