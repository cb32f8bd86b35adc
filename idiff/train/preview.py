"""Rank 0's pictures at each checkpoint: a sample grid (a short DDIM chain from the EMA weights, fixed seeds)
and the loss curves."""

import copy
import warnings

import torch

from .. import rng
from ..diffusion.draw import draw_images
from ..factory import diffusion_for
from ..visualize import image_grid


def write_pictures(spec, *, step: int, run_dir, ema, model, device, num_labels, log) -> None:
    """``samples_{step}.png`` (when train.sample_grid asks for one) and ``loss.png``, also to ``log``'s TensorBoard."""
    if spec.train.sample_grid:
        images = preview_grid(spec, ema, model, run_dir.preview(step), device, num_labels=num_labels)
        if images is not None:
            log.add_image("samples", images, step)
    log.plot(run_dir.loss_plot)
    log.flush()


def preview_grid(spec, ema, model, path, device, num_labels=None):
    """The grid's uint8 NHWC images, drawn from the first EMA rate's weights (the model's own without EMA), or
    None for a model that cannot draw from noise alone. ``num_labels``: labels the data has (class-conditional
    models get them round robin)."""
    cfg = spec.train
    if spec.model.is_super_res:
        warnings.warn("no sample grid for super-resolution models: they need low-resolution inputs", stacklevel=2)
        return None
    ema_model = copy.deepcopy(model).eval()
    if ema.rates:
        with torch.no_grad():
            for p, shadow in zip(ema_model.parameters(), ema.shadows[ema.rates[0]]):
                p.copy_(shadow)
    steps = min(cfg.sample_grid_steps, spec.diffusion.diffusion_steps)
    diffusion = diffusion_for(spec.model, spec.diffusion.model_copy(update={"timestep_respacing": str(steps)}))
    indices = list(range(cfg.sample_grid))
    labels = [i % (num_labels or spec.model.num_classes) for i in indices] if spec.model.class_cond else None
    images, _ = draw_images(ema_model, diffusion, indices, seed=cfg.seed, image_size=spec.model.image_size,
                            sampler="ddim", labels=labels, precision=cfg.precision, device=device,
                            stream=rng.Stream.PREVIEW)
    image_grid(images, path)
    return images
