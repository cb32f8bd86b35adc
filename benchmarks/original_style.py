"""The original implementation's compute choices, re-created on idiff's modules, for side-by-side timing.

timing.json holds the original's medians from another machine; the CPUs there and here differ. To compare
on the same machine, this swaps back what idiff changed for speed, following the original's documented
behaviour (tests/reference/README.md): attention as two einsums over q and k each scaled by ch^-1/4 with
the softmax in fp32; GroupNorm as an fp32 round trip; dropout masks from bernoulli_; a per-parameter
(non-fused) AdamW; sampling under no_grad rather than inference_mode. The numbers it computes are the
same as idiff's to float rounding (tests/test_benchmarks.py checks it).
"""

import contextlib
import math

import torch
import torch.nn as nn

from idiff.models import blocks


def einsum_attention(qkv, num_heads):
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    q, k, v = qkv.reshape(b * num_heads, 3 * ch, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)


def round_trip_group_norm(self, x):
    return nn.GroupNorm.forward(self, x.float()).type(x.dtype)


@contextlib.contextmanager
def original_style():
    """Within this block, idiff's UNet computes the way the original code does."""
    saved = (blocks.qkv_attention, blocks.GroupNorm32.forward, blocks.Dropout.forward)
    blocks.qkv_attention = einsum_attention
    blocks.GroupNorm32.forward = round_trip_group_norm
    blocks.Dropout.forward = nn.Dropout.forward
    try:
        yield
    finally:
        blocks.qkv_attention, blocks.GroupNorm32.forward, blocks.Dropout.forward = saved


def original_optimizer(params, *, lr, weight_decay):
    """torch's AdamW defaults: on CPU tensors, one parameter at a time."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


