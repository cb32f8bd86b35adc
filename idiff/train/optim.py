"""One optimizer step: gradients of the rank batch in microbatches, the learning rate, AdamW, non-finite skips."""

import contextlib

import torch

from .inputs import StepInputs


def make_optimizer(params, *, lr, weight_decay):
    """AdamW, as the original trains (weight decay 0 by default); fused: one pass over all parameters."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def learning_rate(lr: float, anneal_steps: int, step: int) -> float:
    """The original's linear anneal to 0 over ``anneal_steps`` (0: constant), held at 0 after them, never
    negative: a negative rate would ascend the loss."""
    return lr * max(0.0, 1 - step / anneal_steps) if anneal_steps else lr


def set_learning_rate(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def accumulate_gradients(model, diffusion, inputs: StepInputs, *, microbatch: int, scaler=None,
                         precision=None, stats=None) -> torch.Tensor:
    """Backward of this rank's batch in microbatches under ``precision`` (an autocast context); returns the
    per-example losses.

    Each microbatch's weighted loss is summed and divided by the whole rank batch, so the accumulated
    gradient is the rank batch's mean. ``model`` may be DDP (compiled or not): it syncs only on the last
    microbatch and averages over ranks, giving the global batch's mean gradient whatever the split.
    """
    x, t, noise, weights, cond = inputs
    rank_batch = x.shape[0]
    per_example = []
    for start in range(0, rank_batch, microbatch):
        end = min(start + microbatch, rank_batch)
        # a compiled module forwards attribute lookups, no_sync included, to the DDP module it wraps
        defer_sync = hasattr(model, "no_sync") and end < rank_batch
        with model.no_sync() if defer_sync else contextlib.nullcontext():
            with precision or contextlib.nullcontext():
                losses = diffusion.training_losses(model, x[start:end], t[start:end], noise=noise[start:end],
                                                   model_kwargs={k: v[start:end] for k, v in cond.items()})
            loss = (losses["loss"] * weights[start:end]).sum() / rank_batch
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if stats is not None:
            stats.add_losses(t[start:end], losses, weights[start:end])
        per_example.append(losses["loss"].detach())
    return torch.cat(per_example)


def apply_gradients(opt, scaler, params) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale, measure and apply the gradients: (gradient norm, whether it is finite), both on the device.

    A non-finite gradient (identical on all ranks: the gradients are reduced) skips the step.
    """
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    finite = torch.isfinite(grad_norm)
    optimizer_step(opt, scaler, skip=~finite)
    return grad_norm, finite


def optimizer_step(opt, scaler, *, skip) -> None:
    """Step unless ``skip`` (a device bool), decided on the device: no host sync in the loop.

    The fused AdamW reads ``found_inf`` itself, as torch's GradScaler arranges for fp16.
    """
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
        return
    opt.found_inf = skip.float()
    try:
        opt.step()
    finally:
        del opt.found_inf
