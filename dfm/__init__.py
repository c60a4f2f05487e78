"""Decomposable Flow Matching: Laplacian pyramid, timestep/stage sampling, the S-stage objective.

Plain flow matching (SiT) is the one-stage case of everything here.
"""
from dfm.pyramid import LaplacianPyramid, check_stage_scales, down, pyramid_of, up
from dfm.paths import interpolant, velocity_target, score_from_velocity, PATH_TYPES
from dfm.timesteps import sample_timesteps, sample_logit_normal, WEIGHTINGS
from dfm.stages import sample_stages, default_stage_weights, validate_stage_weights, STAGE_SAMPLING
from dfm.objective import FlowMatchingObjective, projection_loss
from dfm.calibration import LevelEnergy, measure_stage_scales

__all__ = [
    "LaplacianPyramid", "check_stage_scales", "pyramid_of", "down", "up",
    "interpolant", "velocity_target", "score_from_velocity", "PATH_TYPES",
    "sample_timesteps", "sample_logit_normal", "WEIGHTINGS",
    "sample_stages", "default_stage_weights", "validate_stage_weights", "STAGE_SAMPLING",
    "FlowMatchingObjective", "projection_loss", "LevelEnergy", "measure_stage_scales",
]
