"""Chain times tuned per model: the grid of ``steps`` model evaluations that brings a sampler closest to a fine
solution of the same ODE, on warm-up images.

Method: GITS (Chen et al. 2024, arXiv 2405.11326; zju-pi/diff-sampler, ``gits-main``), dynamic programming over
a fine grid, then the sampler itself as the judge.

1. A reference trajectory: DPM-Solver++(3M) on ``fine_points`` chain times uniform in log-SNR from the grids'
   start to step 0, from each warm-up x_T; its states x_i and x_0 predictions D_i at every fine time are kept.
2. The cost of going from fine time i to fine time j in one step is the RMSE against x_j of one step from x_i:
   DDIM's (D held at D_i, GITS' cost) and a second-order one (D linear in lambda between D_i and D_j). Both use
   only the D already computed, so every pair costs arithmetic, no model evaluation.
3. Dynamic programming finds, for each cost, the path from the start to step 0 with exactly as many points as
   ``steps`` allows (``points_for``) whose summed local cost is smallest: the exact optimum over the fine grid, in
   O(points x fine_points^2) arithmetic.
4. Those two paths and the fixed spacings (logsnr_uniform, karras, time_uniform) run with the sampler itself on
   the warm-up images; the one ending closest to the reference is kept, with every candidate's error recorded.

Why this and not a gradient-based search (AYS, LD3): the cost is the reference solve and one sampler run per
candidate, ~fine_points + 5 x steps evaluations per warm-up image, deterministic and without hyperparameters to
tune per model; GITS reports gains close to the optimised schedules at 5-10 evaluations. A local error
favours the steps every solver needs (short ones where the trajectory bends), which is why GITS' first-order
schedule carries over to higher-order solvers; the second-order cost is closer to what those solvers' own steps
miss. Step 4 guards the cases where neither fits: the search never returns a schedule worse on its warm-up images
than the default spacing.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import samplers
from .ode_samplers import SPACINGS, dpm_solver_pp, enter_grid, level_at, points_for, time_grid

FINE_POINTS = 100


@dataclass
class SearchResult:
    times: list[float]
    rmse: float  # of the chosen schedule's x_0 to the reference on the warm-up images, in [-1, 1] units
    candidates: dict[str, float] = field(default_factory=dict)  # the RMSE of each candidate schedule
    nfe: int = 0  # model evaluations per warm-up image, the reference's included
    seconds: float = 0.0


@dataclass
class FineReference:
    """The reference solve of warm-up batch ``x_T`` on the fine grid, and the step costs between its times:
    what every sampler and step count is tuned against (steps 1-2 of the module's docstring)."""

    x_T: torch.Tensor
    times: list[float]
    x_0: torch.Tensor
    costs: dict[int, np.ndarray]  # per local order (1, 2): costs[i, j] of one step between fine times i < j
    clip_denoised: bool
    model_kwargs: dict | None
    seconds: float

    @classmethod
    def solve(cls, diffusion, model, x_T, *, clip_denoised=True, model_kwargs=None, fine_points=FINE_POINTS):
        begin = time.perf_counter()
        times = time_grid(diffusion, fine_points, "logsnr_uniform")
        states, predictions = [enter_grid(diffusion, x_T, times[0])], []
        for out in dpm_solver_pp(diffusion, model, x_T, order=3, times=times, clip_denoised=clip_denoised,
                                 model_kwargs=model_kwargs):
            states.append(out["sample"])
            predictions.append(out["pred_xstart"])
        costs = {order: step_costs(diffusion, times, states[:-1], predictions, order) for order in (1, 2)}
        return cls(x_T, times, states[-1].double(), costs, clip_denoised, model_kwargs, time.perf_counter() - begin)

    def rmse(self, x_0) -> float:
        return float(((x_0.double() - self.x_0) ** 2).mean().sqrt())


def step_costs(diffusion, fine_times, states, predictions, order: int) -> np.ndarray:
    """costs[i, j]: RMSE against x_j of one step from x_i to fine time j > i (inf elsewhere), the exponential
    integrator in lambda with D held at D_i (order 1: DDIM) or linear between D_i and D_j (order 2: the local
    error of the second-order solvers, UniPC's corrector in particular). The D are the reference's: no evaluation."""
    levels = [level_at(diffusion, t) for t in fine_times]
    targets = torch.stack([x.double() for x in states])
    ends = torch.stack([d.double() for d in predictions])
    n = len(levels)
    costs = np.full((n, n), np.inf)
    for i in range(n - 1):
        here, there = levels[i], levels[i + 1:]
        h = _per_target([level.lam - here.lam for level in there], states[i].ndim)
        alpha = _per_target([level.alpha for level in there], states[i].ndim)
        ratio = _per_target([level.sigma / here.sigma for level in there], states[i].ndim)
        steps = ratio * states[i].double() + alpha * -torch.expm1(-h) * predictions[i].double()
        if order == 2:  # int_0^h exp(u - h) (u / h) du (D_j - D_i)
            steps = steps + alpha * (h + torch.expm1(-h)) / h * (ends[i + 1:] - predictions[i].double())
        costs[i, i + 1:] = ((steps - targets[i + 1:]) ** 2).flatten(1).mean(1).sqrt().numpy()
    return costs


def _per_target(values, ndim):
    """One coefficient per target time j, shaped to broadcast over a batch of ``ndim`` dimensions."""
    return torch.tensor(values, dtype=torch.float64).view((-1,) + (1,) * ndim)


def cheapest_path(costs: np.ndarray, points: int) -> list[int]:
    """Fine indices 0 = i_0 < ... < i_(points-1) = n-1 minimising the summed costs of their steps."""
    n = len(costs)
    if not 2 <= points <= n:
        raise ValueError(f"a path of {points} points does not fit a fine grid of {n}")
    best = np.full((points, n), np.inf)
    came_from = np.zeros((points, n), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, points):
        totals = best[k - 1][:, None] + costs  # totals[i, j]: reach i in k-1 steps, then i -> j
        came_from[k] = np.argmin(totals, axis=0)
        best[k] = totals[came_from[k], np.arange(n)]
    path = [n - 1]
    for k in range(points - 1, 0, -1):
        path.append(int(came_from[k, path[-1]]))
    return path[::-1]


def tune_times(diffusion, model, reference: FineReference, *, sampler, steps, sampler_options=None) -> SearchResult:
    """The chain times for ``sampler`` with ``steps`` evaluations (and ``sampler_options``) that bring its x_0
    closest to ``reference`` (steps 3-4 of the module's docstring); deterministic given its inputs."""
    begin = time.perf_counter()
    points = points_for(sampler, steps)
    candidates = {f"dp_order_{order}": [reference.times[i] for i in cheapest_path(costs, points)]
                  for order, costs in reference.costs.items()}
    for spacing in SPACINGS:
        try:
            candidates[spacing] = time_grid(diffusion, points, spacing)
        except ValueError:  # time_uniform on a chain shorter than the points
            continue
    errors = {}
    for name, times in candidates.items():
        x_0 = samplers.sample(sampler, diffusion, model, reference.x_T, steps=steps, times=times,
                              clip_denoised=reference.clip_denoised, model_kwargs=reference.model_kwargs,
                              **(sampler_options or {}))
        errors[name] = reference.rmse(x_0)
    chosen = min(errors, key=errors.get)
    return SearchResult(times=candidates[chosen], rmse=errors[chosen], candidates=errors,
                        nfe=len(reference.times) + len(candidates) * steps,
                        seconds=reference.seconds + time.perf_counter() - begin)


def check_times(times, start: int, points: int) -> str | None:
    """What is wrong with ``times`` as a grid from chain step ``start`` to 0 of ``points`` points, or None."""
    if not isinstance(times, list) or not all(isinstance(t, int | float) and not isinstance(t, bool)
                                              for t in times):
        return "times is not a list of numbers"
    if len(times) != points:
        return f"it has {len(times)} points where the steps allow {points}"
    if times[0] != start or times[-1] != 0:
        return f"it runs from {times[0]} to {times[-1]}, not from the chain's start {start} to 0"
    if any(a <= b for a, b in zip(times, times[1:])):
        return "its times are not strictly decreasing"
    return None
