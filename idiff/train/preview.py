"""The sample grid written at each save: a short DDIM chain from the EMA weights, fixed seeds."""

import copy
import warnings

import torch

from .. import rng
from ..diffusion.draw import draw_images
from ..factory import diffusion_from_flags
from ..visualize import image_grid


def preview_grid(spec, ema, model, path, device, num_labels=None) -> None:
    """From the first EMA rate's weights (the model's own without EMA); ``num_labels``: labels the data has
    (class-conditional models get them round robin)."""
    cfg = spec.train
    if spec.model.is_super_res:
        warnings.warn("no sample grid for super-resolution models: they need low-resolution inputs", stacklevel=2)
        return
    ema_model = copy.deepcopy(model).eval()
    if ema.rates:
        with torch.no_grad():
            for p, shadow in zip(ema_model.parameters(), ema.shadows[ema.rates[0]]):
                p.copy_(shadow)
    steps = min(cfg.sample_grid_steps, spec.diffusion.diffusion_steps)
    diffusion = diffusion_from_flags({**spec.model_flags(), "timestep_respacing": str(steps)})
    indices = list(range(cfg.sample_grid))
    labels = [i % (num_labels or spec.model.num_classes) for i in indices] if spec.model.class_cond else None
    images, _ = draw_images(ema_model, diffusion, indices, seed=cfg.seed, image_size=spec.model.image_size,
                            sampler="ddim", labels=labels, precision=cfg.precision, device=device,
                            stream=rng.Stream.PREVIEW)
    image_grid(images, path)
