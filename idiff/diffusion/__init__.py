"""Schedules, respacing, the Gaussian diffusion process, samplers and timestep samplers."""

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, SpacedDiffusion
from .respace import space_timesteps
from .schedules import get_named_beta_schedule
from .timestep_sampler import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

__all__ = [
    "GaussianDiffusion", "SpacedDiffusion", "LossType", "ModelMeanType", "ModelVarType", "space_timesteps",
    "get_named_beta_schedule", "UniformSampler", "LossSecondMomentResampler", "create_named_schedule_sampler",
]
