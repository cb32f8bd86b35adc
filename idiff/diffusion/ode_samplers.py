"""Deterministic solvers of the probability-flow ODE on a discrete IDDPM chain, in the style of k-diffusion.

Noise level and time. A diffusion's chain (all T steps, or those a respacing keeps) has abar_k at its steps
k = 0 .. K-1. With sigma = sqrt((1 - abar) / abar), the noise level of x / sqrt(abar), and lambda = -log sigma
(half the log-SNR), the ODE in lambda has the exact solution x(l2) = (s2 / s1) x(l1) + a2 int exp(l - l2) D dl,
where a = sqrt(abar), s = sqrt(1 - abar) and D is the model's x_0 prediction (``GaussianDiffusion.denoise``:
from its epsilon, or its x_0 directly; a learned variance plays no part). Between two steps log sigma is linear
in the fractional chain time, and the model is fed the timestep interpolated between the two steps' (its
timestep embedding is sinusoidal, so any real time is an input it takes).

Grid. ``steps`` model evaluations are placed from the chain's start (``chain_start``) down to step 0 by ``spacing``:

- ``time_uniform``: the integer steps of IDDPM's respacing "N" of the steps up to the start (with the start at K-1,
  the steps DDIM takes with timestep_respacing N);
- ``logsnr_uniform``: lambda evenly spaced between its values at the start and at step 0;
- ``karras``: sigma_i = (sigma_max^(1/7) + i / (N-1) (sigma_min^(1/7) - sigma_max^(1/7)))^7 (Karras et al. 2022),
  with sigma_max that of the start and sigma_min that of step 0.

The first step. The cosine schedule clips its last betas to 0.999: step K-1 lies at sigma ~4000 against ~130 at
K-2 (T=200). There the model's x_0 prediction is noise (sigma / alpha times its epsilon's error, then clipped),
which the first step of every sampler put into x with weight alpha ~0.008, and which a reference that resolves
those steps follows; that was a floor of ~0.5 pixel units under every sampler (benchmarks/README.md). The grids
therefore start at ``chain_start``, the last chain step whose lambda is at least ``LAMBDA_MIN_CLIPPED`` (DPM-Solver's
``lambda_min_clipped`` for the cosine schedule: K-2 at T=200, K-16 at T=4000; K-1 on the linear schedule, whose
last lambda is -5.03). x_T is carried there by the ODE with D = 0, the centre of the data range, for which the
step is exact: x_start = (s_start / s_(K-1)) x_T (``enter_grid``). The ideal D at such noise is the data's mean
plus O(alpha / sigma): the choice moves x_start by alpha_start times that mean, < 0.008 of x_T's scale, and costs
no model evaluation, so all ``steps`` evaluations go where the model sees something. x_T itself is the same tensor
for every sampler, and deterministic given the sample's index.

The last two spacings place fractional times. Without ``steps`` the multistep solvers step through every step of
the chain from K-1, as DDIM does (DPM-Solver++ of order 1 is DDIM then).

Every sampler ends as DDIM does: the last step goes to sigma = 0, where x_0 is the model's prediction at step 0.
NFE: the multistep methods evaluate the model once per grid point, so NFE = steps; Heun evaluates twice per step
and once at the end, on a grid of steps // 2 + 1 points whose first step is an Euler step when steps is even,
so its NFE is ``steps`` too (``points_for``). Without ``steps`` a sampler evaluates the model once per chain step;
with it, ``spacing`` defaults to logsnr_uniform. No noise is drawn after x_T.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .respace import space_timesteps

SPACINGS = ("time_uniform", "logsnr_uniform", "karras")
DEFAULT_SPACING = "logsnr_uniform"  # the best of the three in benchmarks/README.md


def resolve_spacing(spacing, steps) -> str:
    """``spacing``; unset, logsnr_uniform when ``steps`` is given, else the chain's own steps (time_uniform)."""
    return spacing or (DEFAULT_SPACING if steps else "time_uniform")
KARRAS_RHO = 7.0
LAMBDA_MIN_CLIPPED = -5.1  # where the grids start (see the module's docstring)


@dataclass(frozen=True)
class Level:
    """A grid point: chain time ``t``, x_t = alpha x_0 + sigma eps, and lam = log(alpha / sigma)."""

    t: float
    alpha: float
    sigma: float
    lam: float


def level_at(diffusion, t: float) -> Level:
    alpha_bar = diffusion.alpha_bar_at(t)
    lam = 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))
    return Level(t, math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), lam)


def chain_start(diffusion) -> int:
    """The chain step where the grids start: the last whose lambda is at least LAMBDA_MIN_CLIPPED (at least 1)."""
    alpha_bar = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
    lams = 0.5 * (np.log(alpha_bar) - np.log1p(-alpha_bar))
    above = np.flatnonzero(lams >= LAMBDA_MIN_CLIPPED)
    return int(max(above.max(initial=0), min(1, diffusion.num_timesteps - 1)))


def enter_grid(diffusion, x_T, first_time: float):
    """x at the grid's first time, from x_T at step K-1, by the ODE with D = 0 (see the module's docstring)."""
    last = diffusion.num_timesteps - 1
    if first_time == last:
        return x_T
    return (level_at(diffusion, first_time).sigma / level_at(diffusion, last).sigma) * x_T


def points_for(sampler: str, steps: int) -> int:
    """The grid points of ``sampler`` with ``steps`` model evaluations."""
    return steps // 2 + 1 if sampler == "heun" else steps


def solver_times(diffusion, steps, spacing, times=None) -> list[float]:
    """``times`` when given; else ``steps`` points by ``spacing``; without steps every chain step from K-1."""
    if times:
        return list(times)
    if steps is None:
        return [float(k) for k in range(diffusion.num_timesteps - 1, -1, -1)]
    return time_grid(diffusion, steps, resolve_spacing(spacing, steps))


def time_grid(diffusion, points: int, spacing: str) -> list[float]:
    """``points`` chain times from the chain's start (``chain_start``) down to step 0."""
    start = chain_start(diffusion)
    if points == 1:
        return [float(start)]
    if diffusion.num_timesteps == 1:
        raise ValueError(f"a chain of one step has no room for {points} points")
    if spacing == "time_uniform":
        if points > start + 1:
            raise ValueError(f"time_uniform spacing has at most {start + 1} steps on this chain")
        return [float(k) for k in sorted(space_timesteps(start + 1, str(points)), reverse=True)]
    lam_first, lam_last = level_at(diffusion, start).lam, level_at(diffusion, 0).lam
    fractions = np.linspace(0.0, 1.0, points)
    if spacing == "logsnr_uniform":
        log_sigmas = -(lam_first + fractions * (lam_last - lam_first))
    elif spacing == "karras":
        ends = np.exp(-np.array([lam_first, lam_last])) ** (1 / KARRAS_RHO)
        log_sigmas = KARRAS_RHO * np.log(ends[0] + fractions * (ends[1] - ends[0]))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    inner = [diffusion.time_at(log_sigma) for log_sigma in log_sigmas[1:-1]]
    return [float(start), *inner, 0.0]  # the ends exactly, not as round trips through log sigma


def grid_levels(diffusion, times, progress):
    """The Levels of chain ``times``, behind a progress bar when ``progress``."""
    levels = [level_at(diffusion, t) for t in times]
    return tqdm(levels, desc="sampling", leave=False) if progress else levels


def begin_solve(diffusion, model, x_T, times, *, progress, clip_denoised, denoised_fn, model_kwargs):
    """What every solver begins with: x at the grid's first time (``enter_grid``), the grid's Levels, and D."""
    return (enter_grid(diffusion, x_T, times[0]), list(grid_levels(diffusion, times, progress)),
            denoiser(diffusion, model, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs))


def denoiser(diffusion, model, *, clip_denoised, denoised_fn, model_kwargs):
    """``D(x, level)``: the model's x_0 prediction at a grid point, as every solver here evaluates it."""
    def denoise(x, level):
        with torch.no_grad():
            return diffusion.denoise(model, x, level.t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                     model_kwargs=model_kwargs)
    return denoise


def _multistep_weights(history: list[Level], there: Level) -> list[float]:
    """Weights of the newest-first predictions D_0, D_1, D_2 in int exp(l - l_there) D dl from history[-1] to
    ``there``, times alpha_there: D is replaced by the polynomial through them (order len(history))."""
    here = history[-1]
    h = there.lam - here.lam
    phi_1 = -math.expm1(-h)  # int_0^h exp(u - h) du
    if len(history) == 1:
        weights = [phi_1]
    elif len(history) == 2:
        # DPM-Solver++(2M), Algorithm 2 of Lu et al. (2022): a linear extrapolation of D to the step's midpoint.
        half_over_r = 0.5 * h / (here.lam - history[-2].lam)
        weights = [phi_1 * (1 + half_over_r), -phi_1 * half_over_r]
    else:
        # Third order: the quadratic through the three predictions, p(l_here + u) = D_0 + p' u + c u^2, integrated
        # exactly: phi_2 = int exp(u - h) u du and phi_3 = int exp(u - h) u^2 du.
        phi_2 = h + math.expm1(-h)
        phi_3 = h * h - 2 * phi_2
        h_1, h_2 = here.lam - history[-2].lam, history[-2].lam - history[-3].lam
        # With slopes s_1 = (D_0 - D_1) / h_1, s_2 = (D_1 - D_2) / h_2: c = (s_1 - s_2) / (h_1 + h_2), p' = s_1 + c h_1.
        on_c = (phi_2 * h_1 + phi_3) / (h_1 + h_2)
        on_s_1, on_s_2 = phi_2 + on_c, -on_c
        weights = [phi_1 + on_s_1 / h_1, -on_s_1 / h_1 + on_s_2 / h_2, -on_s_2 / h_2]
    return [there.alpha * w for w in weights]


def dpm_solver_pp(diffusion, model, x, *, order, steps=None, spacing=None, times=None,
                  clip_denoised=True, denoised_fn=None, model_kwargs=None, noise_fn=None, progress=False):
    """Multistep DPM-Solver++ of ``order`` 1 (DDIM), 2 or 3 (Lu et al. 2022), in lambda on the data prediction.
    The first steps use the lower orders their history allows. ``times``: the grid's chain times themselves
    (descending from K-1 to 0) instead of ``steps`` and ``spacing``."""
    del noise_fn  # deterministic: the signature is the samplers' one
    x, grid, denoise = begin_solve(diffusion, model, x, solver_times(diffusion, steps, spacing, times),
                                   progress=progress, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
    history, predictions = [], []
    for i, here in enumerate(grid):
        denoised = denoise(x, here)
        history, predictions = (history + [here])[-order:], ([denoised] + predictions)[:order]
        if i + 1 == len(grid):
            x = denoised
        else:
            there = grid[i + 1]
            x = (there.sigma / here.sigma) * x
            for weight, prediction in zip(_multistep_weights(history, there), predictions):
                x = x + weight * prediction
        yield {"sample": x, "pred_xstart": denoised}


def dpmpp_2m(diffusion, model, x, **kwargs):
    """DPM-Solver++(2M): second order, one model evaluation per step."""
    return dpm_solver_pp(diffusion, model, x, order=2, **kwargs)


def dpmpp_3m(diffusion, model, x, **kwargs):
    """DPM-Solver++(3M): third order, one model evaluation per step."""
    return dpm_solver_pp(diffusion, model, x, order=3, **kwargs)


def heun(diffusion, model, x, *, steps=None, spacing=None, times=None, clip_denoised=True,
         denoised_fn=None, model_kwargs=None, noise_fn=None, progress=False):
    """Heun's second-order method in sigma on x / alpha (Karras et al. 2022, Algorithm 1 without churn).
    ``times``: the grid's chain times themselves (``points_for("heun", steps)`` of them with ``steps``; without,
    every step a Heun step)."""
    del noise_fn
    if times is None:
        evaluations = steps or diffusion.num_timesteps
        times = time_grid(diffusion, evaluations // 2 + 1, resolve_spacing(spacing, steps))
    else:
        evaluations = steps or 2 * len(times) - 1
    x, grid, denoise = begin_solve(diffusion, model, x, times, progress=progress, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
    for i, here in enumerate(grid):
        denoised = denoise(x, here)
        if i + 1 == len(grid):
            yield {"sample": denoised, "pred_xstart": denoised}
            return
        there = grid[i + 1]
        # Euler in sigma on x / alpha is the DDIM step.
        euler = (there.sigma / here.sigma) * x + (there.alpha - there.sigma * here.alpha / here.sigma) * denoised
        if i == 0 and evaluations % 2 == 0:
            x = euler
        else:
            # The trapezoid rule on d(x / alpha) / d(sigma / alpha) = (x / alpha - D) / (sigma / alpha), times alpha.
            stretch = (there.sigma / there.alpha - here.sigma / here.alpha) / (there.sigma / there.alpha)
            x = (0.5 * (1 + stretch)) * euler + (0.5 * there.alpha / here.alpha) * x \
                - (0.5 * stretch * there.alpha) * denoise(euler, there)
        yield {"sample": x, "pred_xstart": denoised}
