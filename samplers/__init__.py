"""Samplers: time schedules (single and multistage), registered integrators (samplers/methods.py), guidance."""
from samplers.schedules import default_schedule, multistage_schedule, sde_schedule, validate_schedule
from samplers.methods import SAMPLER_METHODS, SamplerMethod, StepContext, build_method, check_sampler_settings, describe
from samplers.sampling import GuidedVelocity, check_budgets, sample

__all__ = ["default_schedule", "multistage_schedule", "sde_schedule", "validate_schedule", "sample",
           "SAMPLER_METHODS", "SamplerMethod", "StepContext", "build_method", "check_sampler_settings", "describe",
           "GuidedVelocity", "check_budgets"]
