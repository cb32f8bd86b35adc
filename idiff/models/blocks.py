"""UNet building blocks. Module attribute names are part of the checkpoint format: the released
checkpoints' state-dict keys (``in_layers.2``, ``emb_layers.1``, ``qkv``, ``op`` ...) come from them."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (fp16 statistics overflow)."""

    def forward(self, x):
        if x.dtype == torch.float32:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            if x.device.type == "cpu" and x.dtype == torch.bfloat16:
                # The CPU kernel reads bf16 and accumulates and normalises in fp32 itself: the same
                # numbers as the round trip below, without two full copies of the activations.
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout; on CPUs the mask comes from ``uniform < keep``, twice as fast there as bernoulli_."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep = 1.0 - self.p
        return x * (torch.rand(x.shape, device=x.device) < keep) * (1.0 / keep)


def normalization(channels):
    return GroupNorm32(32, channels)


def zero_module(module):
    """Zero a module's parameters: residual branches start as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps, shape [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A block whose forward also takes the timestep embedding."""

    def forward(self, x, emb):
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (optionally) a 3x3 conv."""

    def __init__(self, channels, use_conv):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """A stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels, use_conv):
        super().__init__()
        self.channels = channels
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


def _maybe_checkpoint(module, enabled, *args):
    if enabled and torch.is_grad_enabled():
        return activation_checkpoint(module._forward, *args, use_reentrant=False)
    return module._forward(*args)


class ResBlock(TimestepBlock):
    """GroupNorm-SiLU-conv twice, conditioned on the embedding, plus a skip connection.

    With ``use_scale_shift_norm`` the embedding gives (scale, shift), scale first, applied as
    ``norm(h) * (1 + scale) + shift``; otherwise it is added to h before the second norm.
    """

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, use_checkpoint=False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        return _maybe_checkpoint(self, self.use_checkpoint, x, emb)

    def _forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions.

    The 1x1 ``qkv`` conv's 3C output channels are split per head into contiguous
    [q_h | k_h | v_h] blocks of C/heads channels: the layout the released weights were trained with.
    """

    def __init__(self, channels, num_heads=1, use_checkpoint=False):
        super().__init__()
        self.channels = channels
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        return _maybe_checkpoint(self, self.use_checkpoint, x)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = qkv_attention(qkv, self.num_heads)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


def qkv_attention(qkv, num_heads):
    """Multi-head attention of a [B, heads*3*ch, T] tensor in the per-head [q|k|v] layout -> [B, heads*ch, T].

    softmax(q.k / sqrt(ch)) v. On GPUs through scaled_dot_product_attention (fused kernels, no T x T
    matrix in memory); on CPUs as two batched matmuls, which measured up to 2x faster than every SDPA
    backend at these head sizes (benchmarks/README.md).
    """
    b, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if qkv.device.type == "cpu":
        q, k, v = qkv.reshape(b * num_heads, 3 * ch, length).split(ch, dim=1)
        scale = ch ** -0.25  # on q and k each, as the original: keeps fp16 products in range
        weight = torch.bmm((q * scale).transpose(1, 2), k * scale)
        weight = torch.softmax(weight.float(), dim=-1).to(qkv.dtype)
        return torch.bmm(v, weight.transpose(1, 2)).reshape(b, num_heads * ch, length)
    # [B, heads, T, ch] with the channel dim contiguous, as the fused kernels want it.
    q, k, v = (part.contiguous() for part in qkv.reshape(b, num_heads, 3 * ch, length).transpose(-1, -2).split(ch, -1))
    h = F.scaled_dot_product_attention(q, k, v)
    return h.transpose(-1, -2).reshape(b, num_heads * ch, length)
