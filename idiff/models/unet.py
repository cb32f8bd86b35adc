"""The IDDPM UNet and its super-resolution variant, with the released checkpoints' key layout."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)
from .state_dict_check import check_state_dict


class UNetModel(nn.Module):
    """UNet with timestep embedding, attention and optional class conditioning.

    :param attention_resolutions: the downsample factors (not resolutions) that get attention.
    :param num_classes: class-conditional with this many labels when not None.
    :param num_heads_upsample: heads in the decoder's attention; -1 means ``num_heads``.
    """

    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0.0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        num_classes=None,
        use_checkpoint=False,
        num_heads=1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.num_heads_upsample = num_heads_upsample

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def res_block(in_ch, out_ch):
            return ResBlock(in_ch, emb_dim, dropout, out_channels=out_ch, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, use_checkpoint=use_checkpoint))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, conv_resample)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), AttentionBlock(ch, num_heads=num_heads, use_checkpoint=use_checkpoint), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads_upsample, use_checkpoint=use_checkpoint))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def forward(self, x, timesteps, y=None):
        """:param x: [N, C, H, W]; :param timesteps: [N] (may be fractional); :param y: [N] labels."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass labels y exactly when the model is class-conditional")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """As nn.Module's, but an architecture mismatch names the flags that probably differ."""
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class SuperResModel(UNetModel):
    """A UNet that also sees a low-resolution image, bilinearly upsampled and concatenated after x."""

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(in_channels * 2, *args, **kwargs)
        self.image_size = image_size

    def forward(self, x, timesteps, low_res=None, **kwargs):
        if low_res is None:
            raise ValueError("the super-resolution model needs low_res")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)
