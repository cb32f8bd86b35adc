"""Noise schedules: the per-step betas, always float64 so that coefficients match the original."""

import math

import numpy as np

SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas of a named schedule; both stay comparable to T=1000 as T changes."""
    if schedule_name == "linear":
        # Ho et al.'s endpoints are for T=1000; scale them so the total noise stays the same.
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(f"unknown noise_schedule {schedule_name!r}; choose one of {', '.join(SCHEDULES)}")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into betas.

    Python floats (not numpy ufuncs) keep the values bit-identical to the original.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        s0 = i / num_diffusion_timesteps
        s1 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(s1) / alpha_bar(s0), max_beta))
    return np.array(betas, dtype=np.float64)
