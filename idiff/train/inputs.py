"""What one training step draws: timesteps, noise and dropout masks, each from keys, none carried over.

Noise and timesteps come from (seed, step, index in the global batch), the same for every world size and
microbatch split. Dropout draws from torch's global generator inside the model, so that generator is reseeded
from (seed, rank, step) before each step: a resumed run draws the masks an uninterrupted one draws, and no
generator state needs saving.
"""

from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import rng


class StepInputs(NamedTuple):
    """This rank's share of one global batch, ready for ``diffusion.training_losses``."""

    x: torch.Tensor  # images
    t: torch.Tensor  # timesteps
    noise: torch.Tensor
    weights: torch.Tensor  # the timestep sampler's importance weights
    cond: dict  # model keyword arguments: class labels, low-resolution images


def draw_inputs(batch, *, spec, timestep_sampler, step: int, rank: int, device) -> StepInputs:
    """Timesteps and noise of ``batch`` (this rank's images) at ``step``."""
    x = batch.images
    cond = {"y": batch.labels} if spec.model.class_cond else {}
    if spec.model.is_super_res:
        cond["low_res"] = F.interpolate(x, spec.model.small_size, mode="area")
    gens = rng.generators(spec.train.seed, rng.Stream.TRAIN_NOISE, global_index(len(x), rank).tolist(), step)
    uniforms = np.array([torch.rand((), generator=g, dtype=torch.float64).item() for g in gens])
    noise = rng.normal(gens, x.shape[1:], device)
    t, weights = timestep_sampler.sample_from_uniforms(uniforms, device)
    return StepInputs(x, t, noise, weights, cond)


def global_index(rank_batch: int, rank: int) -> torch.Tensor:
    """Where this rank's examples sit in the global batch."""
    return torch.arange(rank_batch) + rank * rank_batch


def reseed_dropout(*, seed: int, rank: int, step: int) -> None:
    """Seed torch's global generators (CPU and every GPU), which dropout draws from, for this rank's ``step``."""
    torch.manual_seed(rng.derive_seed(seed, rng.Stream.DROPOUT, rank, step))


def feed_timestep_sampler(timestep_sampler, *, t, losses, rank: int, world_size: int) -> None:
    """Give a loss-aware timestep sampler the whole global batch's losses in global-index order, whatever the world
    size:
    its history, and so the timesteps it draws later, then match a run on any number of ranks."""
    local = torch.stack([global_index(len(t), rank).double(), t.double().cpu(), losses.double().cpu()], dim=1)
    if world_size > 1:
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local)
        local = torch.cat(gathered)
    local = local[local[:, 0].argsort()]
    timestep_sampler.update_with_all_losses(local[:, 1].long().tolist(), local[:, 2].tolist())
