"""iPNDM (Zhang and Chen 2022, arXiv 2204.13902; the "improved PNDM" of diff-solvers): explicit Adams-Bashforth
on the noise prediction, in the variables of Karras et al. (2022), y = x / alpha against t = sigma / alpha, where
dy/dt = eps = (y - D) / t. Orders up to 4, the first steps taking the lower orders their history allows.

The published iPNDM uses the fixed Adams-Bashforth coefficients of a uniform grid (3/2, -1/2; 23/12, -16/12,
5/12; ...) whatever the step sizes. Here the weights are those of the actual steps, the integrals over the step
of the Lagrange polynomials through the earlier points (the variable-step form, diff-solvers' ``ipndm_v``): the
same numbers on a uniform grid, and the nominal order on any smooth grid, spacings and tuned schedules alike.
"""

import numpy as np

from .ode_samplers import begin_solve, solver_times

MAX_ORDER = 4
_NODES, _QUADRATURE_WEIGHTS = np.polynomial.legendre.leggauss(MAX_ORDER)  # exact for degree < 2 MAX_ORDER


def adams_bashforth_weights(ts: list[float], t_next: float) -> list[float]:
    """int_{ts[0]}^{t_next} L_k(t) dt for the Lagrange basis L_k of the nodes ``ts`` (newest first)."""
    t_here = ts[0]
    quad_t = t_here + (t_next - t_here) * (_NODES + 1) / 2
    weights = []
    for k, t_k in enumerate(ts):
        basis = np.prod([(quad_t - t_j) / (t_k - t_j) for j, t_j in enumerate(ts) if j != k], axis=0)
        weights.append(float((t_next - t_here) / 2 * np.sum(_QUADRATURE_WEIGHTS * basis)))
    return weights


def ipndm(diffusion, model, x, *, order=MAX_ORDER, steps=None, spacing=None, times=None, clip_denoised=True,
          denoised_fn=None, model_kwargs=None, noise_fn=None, progress=False):
    """iPNDM of ``order`` 1 (DDIM) to 4, one model evaluation per grid point. ``times`` as in
    ``ode_samplers.dpm_solver_pp``."""
    del noise_fn
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"iPNDM takes order 1 to {MAX_ORDER}, got {order}")
    x, grid, denoise = begin_solve(diffusion, model, x, solver_times(diffusion, steps, spacing, times),
                                   progress=progress, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
    ts, slopes = [], []  # newest first: t = sigma / alpha at the earlier points, and eps there
    for i, here in enumerate(grid):
        denoised = denoise(x, here)
        if i + 1 == len(grid):
            yield {"sample": denoised, "pred_xstart": denoised}
            return
        there = grid[i + 1]
        t_here = here.sigma / here.alpha
        ts, slopes = ([t_here] + ts)[:order], [(x / here.alpha - denoised) / t_here] + slopes[:order - 1]
        y = x / here.alpha
        for weight, slope in zip(adams_bashforth_weights(ts, there.sigma / there.alpha), slopes):
            y = y + weight * slope
        x = there.alpha * y
        yield {"sample": x, "pred_xstart": denoised}
