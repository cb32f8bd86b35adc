"""The spec's ``precision`` as an autocast context: fp32 runs unchanged, bf16/fp16 under torch.autocast."""

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device, precision: str):
    """A fresh context manager for ``precision`` ("fp32", "bf16", "fp16") on ``device`` (a device or its type)."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])
