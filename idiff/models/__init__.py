"""The IDDPM UNet, its super-resolution variant, and state-dict diagnostics."""

from .state_dict_check import ArchitectureMismatch, describe_architecture
from .unet import SuperResModel, UNetModel

__all__ = ["UNetModel", "SuperResModel", "ArchitectureMismatch", "describe_architecture"]
