"""Drawing images for sample indices: sample i is a pure function of (model, seed, i).

Its label, x_T and every step's noise come from one generator seeded by (seed, i), so that any batch
size, world size or sampler gives the same x_T for an index, and images can be compared one by one.
"""

import numpy as np
import torch

from .. import rng
from ..precision import autocast
from ..visualize import to_uint8
from . import samplers


def draw_images(model, diffusion, indices, **kwargs):
    """uint8 NHWC images (and labels) for sample ``indices``: ``draw_samples`` quantised."""
    x_0, labels = draw_samples(model, diffusion, indices, **kwargs)
    return to_uint8(x_0), labels


def draw_samples(model, diffusion, indices, *, seed, image_size, sampler="ancestral", sampler_options=None,
                 clip_denoised=True, labels=None, num_classes=None, low_res=None, precision="fp32", device="cpu",
                 stream=rng.Stream.SAMPLE):
    """x_0 in [-1, 1], NCHW, (and labels) for sample ``indices``, drawn by ``samplers.SAMPLERS[sampler]`` with
    ``sampler_options`` (``eta``; ``steps``, ``spacing``). x_T of an index is the same whatever the sampler.

    ``labels``: None (unconditional), a label per index, or "random" (drawn from each sample's own
    generator among ``num_classes``); ``low_res``: the super-resolution model's inputs, per index.
    """
    gens, x_t, model_kwargs, labels = sample_inputs(indices, seed=seed, image_size=image_size, labels=labels,
                                                    num_classes=num_classes, low_res=low_res, device=device,
                                                    stream=stream)
    with torch.inference_mode(), autocast(device, precision):
        x_0 = samplers.sample(sampler, diffusion, model, x_t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                              noise_fn=rng.PerSampleNoise(gens), **(sampler_options or {}))
    return x_0, (np.asarray(labels, dtype=np.int64) if labels is not None else None)


def sample_inputs(indices, *, seed, image_size, labels=None, num_classes=None, low_res=None, device="cpu",
                  stream=rng.Stream.SAMPLE):
    """(per-index generators, x_T, model_kwargs, labels) of sample ``indices``; ``labels`` as in draw_samples."""
    gens = rng.generators(seed, stream, indices)
    if isinstance(labels, str):
        labels = [int(torch.randint(num_classes, (), generator=g)) for g in gens]
    x_t = rng.normal(gens, (3, image_size, image_size), device)
    model_kwargs = {}
    if labels is not None:
        model_kwargs["y"] = torch.as_tensor(labels, dtype=torch.long, device=device)
    if low_res is not None:
        model_kwargs["low_res"] = low_res.to(device)
    return gens, x_t, model_kwargs, labels


def labels_for(indices, mode, num_classes):
    """Labels of a class-conditional job; 'random' is drawn from each sample's own generator later."""
    if mode == "random":
        return "random"
    if mode == "balanced":
        return [i % num_classes for i in indices]
    return [mode[i % len(mode)] for i in indices]
