"""Samplers: time schedules (single and multistage), ODE/SDE integrators, guidance."""
from samplers.schedules import multistage_schedule, sde_schedule, validate_schedule
from samplers.sampling import METHODS, GuidedVelocity, check_budgets, sample

__all__ = ["multistage_schedule", "sde_schedule", "validate_schedule", "sample", "METHODS", "GuidedVelocity",
           "check_budgets"]
