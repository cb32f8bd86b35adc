"""The original implementation's compute choices, re-created on idiff's modules, for side-by-side timing.

timing.json holds the original's medians from another machine; the CPUs there and here differ. To compare
on the same machine, this swaps back what idiff changed for speed, following the original's documented
behaviour (tests/reference/README.md): GroupNorm as an fp32 round trip; dropout masks from bernoulli_; a
per-parameter (non-fused) AdamW; sampling under no_grad rather than inference_mode. idiff's CPU attention
already computes as the original does (two batched matmuls, q and k each scaled by ch^-1/4, softmax in
fp32), so it stays.
"""

import contextlib

import torch
import torch.nn as nn

from idiff.models import blocks


def round_trip_group_norm(self, x):
    return nn.GroupNorm.forward(self, x.float()).type(x.dtype)


@contextlib.contextmanager
def original_style():
    """Within this block, idiff's UNet computes the way the original code does."""
    saved = (blocks.GroupNorm32.forward, blocks.Dropout.forward)
    blocks.GroupNorm32.forward = round_trip_group_norm
    blocks.Dropout.forward = nn.Dropout.forward
    try:
        yield
    finally:
        blocks.GroupNorm32.forward, blocks.Dropout.forward = saved


def original_optimizer(params, *, lr, weight_decay):
    """torch's AdamW defaults: on CPU tensors, one parameter at a time."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


