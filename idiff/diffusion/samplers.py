"""Sampling loops as plain generator functions with one signature.

``sampler(diffusion, model, x_T, *, clip_denoised, denoised_fn, model_kwargs, noise_fn, progress,
**options)`` yields each step's ``{"sample", "pred_xstart"}``, from t = T-1 down to 0.
``noise_fn(x)`` draws the fresh noise of a step, shaped like ``x``: pass a per-sample noise
source to make each image independent of the batch it is drawn in. The ODE samplers of
``ode_samplers`` draw none and take ``steps`` and ``spacing`` as options.
"""

import collections

import torch
from tqdm.auto import tqdm

from .ipndm import ipndm
from .ode_samplers import dpmpp_2m, dpmpp_3m, heun
from .unipc import unipc


def reversed_steps(num_timesteps: int, progress=False):
    """T-1 ... 0; ``progress``: True for a tqdm bar, or a function called with 1 after each step is done."""
    steps = range(num_timesteps - 1, -1, -1)
    if callable(progress):
        return _counted(steps, progress)
    return tqdm(steps, desc="sampling", leave=False) if progress else steps


def _counted(steps, done):
    for step in steps:
        yield step
        done(1)


def _loop(step_method, diffusion, model, x, *, progress, **step_kwargs):
    for step in reversed_steps(diffusion.num_timesteps, progress):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        with torch.no_grad():
            out = step_method(model, x, t, **step_kwargs)
        yield out
        x = out["sample"]


def ancestral(diffusion, model, x, *, clip_denoised=True, denoised_fn=None, model_kwargs=None, noise_fn=None,
              progress=False):
    """DDPM ancestral sampling with the model's (learned or fixed) variance."""
    yield from _loop(diffusion.p_sample, diffusion, model, x, progress=progress, clip_denoised=clip_denoised,
                     denoised_fn=denoised_fn, model_kwargs=model_kwargs, noise_fn=noise_fn)


def ddim(diffusion, model, x, *, clip_denoised=True, denoised_fn=None, model_kwargs=None, noise_fn=None,
         progress=False, eta=0.0):
    """DDIM (Song et al. 2021); ``eta`` scales the injected noise, 0 is deterministic."""
    yield from _loop(diffusion.ddim_sample, diffusion, model, x, progress=progress, clip_denoised=clip_denoised,
                     denoised_fn=denoised_fn, model_kwargs=model_kwargs, noise_fn=noise_fn, eta=eta)


SAMPLERS = {"ancestral": ancestral, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "dpmpp_3m": dpmpp_3m, "heun": heun,
            "unipc": unipc, "ipndm": ipndm}
ODE_SAMPLERS = ("dpmpp_2m", "dpmpp_3m", "heun", "unipc", "ipndm")
# The fewest model evaluations with which a sampler takes one step of its full order before its final step to x_0
# (a multistep method of order k needs k - 1 earlier evaluations, Heun two evaluations per step).
# UniPC's and iPNDM's at their default orders (2 and 4); with fewer evaluations they stay at lower orders.
MIN_STEPS = {"ancestral": 1, "ddim": 1, "dpmpp_2m": 3, "dpmpp_3m": 4, "heun": 3, "unipc": 3, "ipndm": 5}
MAX_SOLVER_ORDER = {"unipc": 3, "ipndm": 4}  # the samplers whose order a spec chooses (sample.solver_order)


def sample(name, diffusion, model, x, **kwargs):
    """Run sampler ``name`` to the end and return x_0."""
    (final,) = collections.deque(SAMPLERS[name](diffusion, model, x, **kwargs), maxlen=1)  # keeps the last step only
    return final["sample"]
