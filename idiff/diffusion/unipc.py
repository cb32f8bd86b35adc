"""UniPC (Zhao et al. 2023, arXiv 2302.04867): a multistep predictor (UniP) and a corrector (UniC) on the data
prediction in lambda, in the notation of ``ode_samplers``.

The step from grid point ``here`` to ``there`` is x_there = (sigma_there / sigma_here) x_here + alpha_there
[(1 - e^-h) D_here - B(h) sum_k rho_k (D_k - D_here) / r_k], with r_k = (lambda_k - lambda_here) / h for the
earlier predictions D_k. The rho solve the order conditions of the paper's Theorem 3.1 (``_rhos``); B(h) = h (bh1)
or e^h - 1 (bh2). The corrector re-takes the step that led to a grid point once the model has been evaluated there,
with that evaluation as one more point: it raises the order by one and costs no evaluation, since the next step
needs that evaluation anyway. The last step, into the final x_0, is not corrected: that would take one more.
The model's evaluations stay those at the predicted points, as in the reference implementation (wl-zhao/UniPC).
"""

import math

import numpy as np

from .ode_samplers import Level, begin_solve, solver_times

VARIANTS = ("bh1", "bh2")


def _rhos(h: float, ratios: list[float], variant: str, corrector: bool) -> list[float]:
    """The rho of the predictor (``ratios`` r_k of the earlier points) or of the corrector (r = 1 appended)."""
    hh = -h  # the data prediction integrates exp(-h)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rs = np.array([*ratios, 1.0])
    order = len(rs)  # equations: one per point the polynomial goes through beyond D_here
    phi, factorial, rows, rhs = math.expm1(hh) / hh - 1, 1, [], []
    for i in range(1, order + 1):
        rows.append(rs ** (i - 1))
        rhs.append(phi * factorial / b_h)
        factorial *= i + 1
        phi = phi / hh - 1 / factorial
    rows, rhs = np.array(rows), np.array(rhs)
    if not corrector:
        rows, rhs = rows[:-1, :-1], rhs[:-1]
        if len(ratios) == 1:
            return [0.5]  # the reference implementation's second-order predictor
    elif not ratios:
        return [0.5]
    return list(np.linalg.solve(rows, rhs)) if len(rhs) else []


def unipc_weights(history: list[Level], there: Level, variant: str, corrector: bool) -> list[float]:
    """Weights (times alpha_there) of the newest-first predictions D_here, D_1, ... (and, for the corrector, D_there
    last) in the step from history[-1] to ``there``."""
    here = history[-1]
    h = there.lam - here.lam
    ratios = [(level.lam - here.lam) / h for level in reversed(history[:-1])]
    rhos = _rhos(h, ratios, variant, corrector)
    b_h = -h if variant == "bh1" else math.expm1(-h)
    weights = [-math.expm1(-h)] + [0.0] * len(ratios)
    for k, (rho, r) in enumerate(zip(rhos, [*ratios, 1.0])):  # rho_k (D_k - D_here) / r_k, D_there's r = 1
        if k < len(ratios):
            weights[k + 1] -= b_h * rho / r
        else:
            weights.append(-b_h * rho)
        weights[0] += b_h * rho / r
    return [there.alpha * w for w in weights]


def unipc(diffusion, model, x, *, order=2, variant="bh2", steps=None, spacing=None, times=None, clip_denoised=True,
          denoised_fn=None, model_kwargs=None, noise_fn=None, progress=False):
    """UniPC of ``order`` 2 or 3 (the predictor's; the corrector adds one), B(h) ``variant`` bh1 or bh2, one model
    evaluation per grid point; the first steps use the lower orders their history allows. ``times`` as in
    ``ode_samplers.dpm_solver_pp``."""
    del noise_fn
    if order not in (1, 2, 3) or variant not in VARIANTS:
        raise ValueError(f"UniPC takes order 1, 2 or 3 and variant {' or '.join(VARIANTS)}, got {order}, {variant}")
    x, grid, denoise = begin_solve(diffusion, model, x, solver_times(diffusion, steps, spacing, times),
                                   progress=progress, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
    history, predictions, x_before = [], [], None
    for i, here in enumerate(grid):
        denoised = denoise(x, here)
        if history and i + 1 < len(grid):  # UniC: the step into here again, with D_here as one more point
            weights = unipc_weights(history, here, variant, corrector=True)
            x = (here.sigma / history[-1].sigma) * x_before
            for weight, prediction in zip(weights, [*predictions, denoised]):
                x = x + weight * prediction
        history, predictions = (history + [here])[-order:], ([denoised] + predictions)[:order]
        if i + 1 == len(grid):
            x = denoised
        else:
            there, x_before = grid[i + 1], x
            x = (there.sigma / here.sigma) * x
            for weight, prediction in zip(unipc_weights(history, there, variant, corrector=False), predictions):
                x = x + weight * prediction
        yield {"sample": x, "pred_xstart": denoised}
