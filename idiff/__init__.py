"""idiff: Improved DDPM (Nichol & Dhariwal 2021), numerically identical to the original, as batch jobs.

The package is a drop-in for the original's ``improved_diffusion.script_util``: the same names, arguments and
defaults, so its scripts run with ``from idiff import ...``.
"""

from .factory import (
    NUM_CLASSES,
    create_gaussian_diffusion,
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    sr_create_model,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from .jobspec.flags import add_dict_to_argparser, args_to_dict, str2bool

__version__ = "0.1.0"
__all__ = [
    "NUM_CLASSES",
    "model_and_diffusion_defaults",
    "create_model_and_diffusion",
    "create_model",
    "create_gaussian_diffusion",
    "sr_model_and_diffusion_defaults",
    "sr_create_model_and_diffusion",
    "sr_create_model",
    "add_dict_to_argparser",
    "args_to_dict",
    "str2bool",
]
