"""Timestep samplers: which t each training example gets, and the importance weight of its loss.

Importance sampling keeps the loss unbiased: an example drawn with probability p_t gets weight
1 / (T p_t). ``loss-second-moment`` (the paper's L_vlb sampler) draws t in proportion to the
root-mean-square of its recent losses.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch

SCHEDULE_SAMPLERS = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name, diffusion):
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule_sampler {name!r}; choose one of {', '.join(SCHEDULE_SAMPLERS)}")


class ScheduleSampler(ABC):
    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised, positive sampling weight of every timestep."""

    def probabilities(self) -> np.ndarray:
        w = self.weights()
        return w / np.sum(w)

    def sample_from_uniforms(self, uniforms, device):
        """Timesteps for given U[0, 1) draws, one per example: (t, importance weights).

        Inverse-CDF sampling lets each example own its random number, so a batch's timesteps do
        not depend on how the batch is split across ranks.
        """
        p = self.probabilities()
        cdf = np.cumsum(p)
        t = np.minimum(np.searchsorted(cdf, np.asarray(uniforms, dtype=np.float64) * cdf[-1], side="right"), len(p) - 1)
        weights = 1 / (len(p) * p[t])
        return (torch.from_numpy(np.asarray(t, dtype=np.int64)).to(device),
                torch.from_numpy(weights).float().to(device))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:  # what a stateless sampler saved is empty: this is another sampler's state
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has {', '.join(sorted(state))}")


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Record the losses of the whole (global) batch; every rank must call this identically."""


class LossSecondMomentResampler(LossAwareSampler):
    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            t = int(t)
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())

    def state_dict(self):
        # Tensors, not numpy arrays, so that checkpoints load with weights_only=True.
        return {"loss_history": torch.from_numpy(self._loss_history.copy()),
                "loss_counts": torch.from_numpy(self._loss_counts.copy())}

    def load_state_dict(self, state):
        history = state["loss_history"].numpy()
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"timestep sampler history has shape {tuple(history.shape)}, expected "
                f"{self._loss_history.shape} (different diffusion_steps?)"
            )
        self._loss_history = history.astype(np.float64).copy()
        self._loss_counts = state["loss_counts"].numpy().astype(np.int64).copy()
