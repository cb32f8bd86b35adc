"""Randomness derived from keys instead of stored: a value depends on (seed, purpose, ...) only.

Training noise and timesteps come from (seed, step, global sample index), data order from
(seed, epoch), a sample image from (seed, index). None of them depend on the number of ranks,
the batch split, or whether the run was interrupted.
"""

import enum

import numpy as np
import torch


class Stream(enum.IntEnum):
    """Separate purposes get unrelated streams even for equal keys."""

    TRAIN_NOISE = 1
    DATA_ORDER = 2
    DATA_FLIP = 3
    SAMPLE = 4
    NLL = 5
    PREVIEW = 6
    PROCESS = 7
    SYNTHETIC = 8
    DROPOUT = 9


def derive_seed(*keys: int) -> int:
    """A 64-bit seed from non-negative integer keys (numpy's SeedSequence hashing).

    The key count is hashed too: SeedSequence alone ignores trailing zeros, so (s, 7) and (s, 7, 0) would collide.
    """
    return int(np.random.SeedSequence([len(keys), *(int(k) for k in keys)]).generate_state(1, dtype=np.uint64)[0])


def generators(seed: int, stream: Stream, indices, *prefix: int) -> list[torch.Generator]:
    """One CPU generator per index, seeded by (seed, stream, *prefix, index)."""
    return [torch.Generator().manual_seed(derive_seed(seed, stream, *prefix, int(i))) for i in indices]


def normal(gens: list[torch.Generator], shape, device=None) -> torch.Tensor:
    """Stack one N(0, I) draw of ``shape`` from each generator: [len(gens), *shape]."""
    out = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return out.to(device, non_blocking=True) if device is not None else out


class PerSampleNoise:
    """A sampler ``noise_fn`` whose row i always comes from generator i, whatever the batch."""

    def __init__(self, gens: list[torch.Generator]):
        self.gens = gens

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        assert like.shape[0] == len(self.gens), "one generator per example"
        return normal(self.gens, like.shape[1:], like.device).to(like.dtype)
