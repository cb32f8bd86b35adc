"""idiff: Improved DDPM (Nichol & Dhariwal 2021), numerically identical to the original, as batch jobs."""

from .factory import (
    create_gaussian_diffusion,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)

__version__ = "0.1.0"
__all__ = [
    "model_and_diffusion_defaults",
    "create_model_and_diffusion",
    "sr_model_and_diffusion_defaults",
    "sr_create_model_and_diffusion",
    "create_gaussian_diffusion",
]
