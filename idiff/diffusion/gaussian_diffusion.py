"""Gaussian diffusion: the forward process, the model's reverse process, and the IDDPM losses.

Numerical contract with the original (see tests/reference/README.md): every per-timestep
coefficient is a float64 table, gathered at ``t`` and only then cast to float32; all arithmetic
on images is float32. ``t`` always indexes this object's own (possibly respaced) chain; the model
is fed the original timestep, times 1000/T when ``rescale_timesteps``.
"""

import enum
import math

import numpy as np
import torch

from . import samplers
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    """What the model's first output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """How the reverse-process variance is chosen."""

    LEARNED = enum.auto()  # the model outputs log-variance directly
    FIXED_SMALL = enum.auto()  # the posterior variance (sigma_small)
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # the model interpolates between the two above (IDDPM)


class LossType(enum.Enum):
    MSE = enum.auto()  # simple loss; plus the VB term when the variance is learned
    RESCALED_MSE = enum.auto()  # L_hybrid: as MSE, with the VB term scaled by T/1000
    KL = enum.auto()  # L_vlb
    RESCALED_KL = enum.auto()  # L_vlb times T, so it is on the scale of a sum over timesteps

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


_LOG2 = np.log(2.0)


def _process_xstart(x_start, clip_denoised, denoised_fn):
    if denoised_fn is not None:
        x_start = denoised_fn(x_start)
    return x_start.clamp(-1, 1) if clip_denoised else x_start


class GaussianDiffusion:
    """Diffusion over ``betas``; ``timestep_map`` maps this chain's steps to the model's steps."""

    def __init__(
        self,
        *,
        betas,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
        timestep_map=None,
        original_num_steps: int | None = None,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps

        betas = np.array(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must be in (0, 1]"
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        self.original_num_steps = original_num_steps or self.num_timesteps

        # The exact float64 formulas of the original: a different but equivalent expression can
        # round to another float32 after the cast.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0; its log is clipped to the t=1 value.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self._tables = {
            "alphas_cumprod": self.alphas_cumprod,
            "alphas_cumprod_prev": self.alphas_cumprod_prev,
            "alphas_cumprod_next": self.alphas_cumprod_next,
            "one_minus_alphas_cumprod": 1.0 - self.alphas_cumprod,
            "sqrt_alphas_cumprod": self.sqrt_alphas_cumprod,
            "sqrt_one_minus_alphas_cumprod": self.sqrt_one_minus_alphas_cumprod,
            "log_one_minus_alphas_cumprod": self.log_one_minus_alphas_cumprod,
            "sqrt_recip_alphas_cumprod": self.sqrt_recip_alphas_cumprod,
            "sqrt_recipm1_alphas_cumprod": self.sqrt_recipm1_alphas_cumprod,
            "posterior_variance": self.posterior_variance,
            "posterior_log_variance_clipped": self.posterior_log_variance_clipped,
            "posterior_mean_coef1": self.posterior_mean_coef1,
            "posterior_mean_coef2": self.posterior_mean_coef2,
            "recip_posterior_mean_coef1": 1.0 / self.posterior_mean_coef1,
            "posterior_mean_coef2_over_coef1": self.posterior_mean_coef2 / self.posterior_mean_coef1,
            "log_betas": np.log(betas),
            "fixed_large_variance": fixed_large_variance,
            "fixed_large_log_variance": np.log(fixed_large_variance),
            "timestep_map": np.array(self.timestep_map, dtype=np.int64),
        }
        self._tables_on = {}

    # ------------------------------------------------------------------ helpers
    def _table(self, name, device):
        tables = self._tables_on.get(device)
        if tables is None:
            tables = {key: torch.from_numpy(value).to(device) for key, value in self._tables.items()}
            self._tables_on[device] = tables
        return tables[name]

    def _extract(self, name, t, broadcast_shape):
        """Gather a float64 table at ``t``, cast to float32, broadcast to ``broadcast_shape``."""
        values = self._table(name, t.device)[t].float()
        return values.view(-1, *([1] * (len(broadcast_shape) - 1))).expand(broadcast_shape)

    def model_timesteps(self, t):
        """The timesteps the model is fed for chain steps ``t``; a floating ``t`` between two steps (the ODE
        samplers' fractional times) gets the original timestep interpolated linearly between theirs."""
        table = self._table("timestep_map", t.device)
        if t.is_floating_point():
            below = t.floor().long().clamp(0, self.num_timesteps - 1)
            above = (below + 1).clamp(max=self.num_timesteps - 1)
            original = (table[below] + (t.double() - below) * (table[above] - table[below])).float()
        else:
            original = table[t]
        if self.rescale_timesteps:
            return original.float() * (1000.0 / self.original_num_steps)
        return original

    def _call_model(self, model, x, t, model_kwargs):
        return model(x, self.model_timesteps(t), **(model_kwargs or {})).to(x.dtype)

    # ------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        assert noise.shape == x_start.shape
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        assert x_start.shape == x_t.shape
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape)
        log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return mean, variance, log_variance_clipped

    # ------------------------------------------------------------ reverse process
    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """The model's p(x_{t-1} | x_t): dict of ``mean``, ``variance``, ``log_variance``, ``pred_xstart``."""
        return self._p_mean_variance_from_output(
            self._call_model(model, x, t, model_kwargs), x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn
        )

    def _p_mean_variance_from_output(self, model_output, x, t, *, clip_denoised=True, denoised_fn=None):
        channels = x.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            assert model_output.shape == (x.shape[0], channels * 2, *x.shape[2:])
            model_output, var_values = torch.split(model_output, channels, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                # v in [-1, 1] interpolates the log-variance between the posterior's and beta's;
                # the original does not clamp v, so neither do we.
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (var_values + 1) / 2
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self._extract("fixed_large_variance", t, x.shape)
            log_variance = self._extract("fixed_large_log_variance", t, x.shape)
        else:
            variance = self._extract("posterior_variance", t, x.shape)
            log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = _process_xstart(self._predict_xstart_from_xprev(x, t, model_output), clip_denoised,
                                          denoised_fn)
            mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = _process_xstart(model_output, clip_denoised, denoised_fn)
            else:
                pred_xstart = _process_xstart(self._predict_xstart_from_eps(x, t, model_output), clip_denoised,
                                              denoised_fn)
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        return (
            self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
            - self._extract("posterior_mean_coef2_over_coef1", t, x_t.shape) * x_t
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    # ------------------------------------------ continuous time (the ODE samplers)
    def alpha_bar_at(self, t: float) -> float:
        """abar at chain time ``t`` in [0, T-1]: the table's value at a step; between two steps, log sigma (with
        sigma^2 = (1 - abar) / abar) is interpolated linearly in t, as k-diffusion does for discrete schedules."""
        if float(t).is_integer():
            return float(self.alphas_cumprod[int(t)])
        sigma_squared = np.exp(2 * np.interp(t, np.arange(self.num_timesteps), self._log_sigmas))
        return float(1.0 / (1.0 + sigma_squared))

    def time_at(self, log_sigma: float) -> float:
        """The chain time (fractional) whose noise level is ``log_sigma``: the inverse of ``alpha_bar_at``."""
        return float(np.interp(log_sigma, self._log_sigmas, np.arange(self.num_timesteps)))

    @property
    def _log_sigmas(self):
        return 0.5 * np.log(1.0 / self.alphas_cumprod - 1.0)

    def denoise(self, model, x, t: float, *, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """The model's x_0 for ``x`` at chain time ``t`` (fractional allowed): the denoiser of the probability-flow
        ODE. Only the mean half of a learned-variance output is used; an x_0-predicting model is used directly."""
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            raise ValueError("the ODE samplers need a model that predicts the noise or x_0, not x_{t-1}")
        steps = torch.full((x.shape[0],), float(t), dtype=torch.float64, device=x.device)
        output = self._call_model(model, x, steps, model_kwargs)[:, : x.shape[1]]
        if self.model_mean_type == ModelMeanType.EPSILON:
            alpha_bar = self.alpha_bar_at(t)
            # The float64 coefficients of _predict_xstart_from_eps, so that at a step the two agree exactly.
            output = math.sqrt(1.0 / alpha_bar) * x - math.sqrt(1.0 / alpha_bar - 1) * output
        return _process_xstart(output, clip_denoised, denoised_fn)

    # ------------------------------------------------------------------ sampling
    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, noise_fn=None):
        """One ancestral step x_t -> x_{t-1}: dict of ``sample`` and ``pred_xstart``."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = (noise_fn or torch.randn_like)(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise at t=0
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0, noise_fn=None):
        """One DDIM step x_t -> x_{t-1}; ``eta`` = 0 is deterministic, 1 is ancestral-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # eps is re-derived from the clipped x_0 so that the step stays on the data manifold.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        # Drawn even when eta == 0, so the RNG stream matches the original's.
        noise = (noise_fn or torch.randn_like)(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """One deterministic DDIM step x_t -> x_{t+1} (encoding an image into its latent)."""
        assert eta == 0.0, "the reverse ODE is only defined for eta == 0"
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, noise_fn=None):
        """Ancestral sampling from x_T (``noise``, or fresh N(0, I)) down to x_0."""
        return samplers.sample("ancestral", self, model, self._initial_noise(model, shape, noise, device),
                               clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                               noise_fn=noise_fn, progress=progress)

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  model_kwargs=None, device=None, progress=False, noise_fn=None):
        """Yield every step's ``p_sample`` output."""
        return samplers.ancestral(self, model, self._initial_noise(model, shape, noise, device),
                                  clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                                  noise_fn=noise_fn, progress=progress)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, progress=False, eta=0.0, noise_fn=None):
        """DDIM sampling from x_T down to x_0 over this (usually respaced) chain."""
        return samplers.sample("ddim", self, model, self._initial_noise(model, shape, noise, device),
                               clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                               noise_fn=noise_fn, progress=progress, eta=eta)

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0, noise_fn=None):
        """Yield every step's ``ddim_sample`` output."""
        return samplers.ddim(self, model, self._initial_noise(model, shape, noise, device),
                             clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs,
                             noise_fn=noise_fn, progress=progress, eta=eta)

    @staticmethod
    def _initial_noise(model, shape, noise, device):
        if noise is not None:
            return noise
        if device is None:
            device = next(model.parameters()).device
        return torch.randn(*shape, device=device)

    # -------------------------------------------------------------------- losses
    def vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """The VLB term L_t in bits per dimension: KL for t > 0, decoder NLL at t = 0."""
        return self._vb_terms_from_output(
            self._call_model(model, x_t, t, model_kwargs), x_start, x_t, t, clip_denoised=clip_denoised
        )

    def _vb_terms_from_output(self, model_output, x_start, x_t, t, *, clip_denoised):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LOG2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LOG2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses: ``loss``, plus ``mse`` and ``vb`` where the loss type has them."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        if self.loss_type.is_vb():
            loss = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                loss = loss * self.num_timesteps
            return {"loss": loss}

        terms = {}
        model_output = self._call_model(model, x_t, t, model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = torch.split(model_output, x_t.shape[1], dim=1)
            # Stop-gradient on the mean: the VB term only trains the variance (L_hybrid).
            frozen = torch.cat([model_output.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_from_output(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # The MSE term is a mean over timesteps while L_vlb is a sum; T/1000 matches the paper's lambda.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension; ~0 for a well-designed schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / _LOG2

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, noise_fn=None, progress=False):
        """The full VLB in bits/dim, with its per-timestep terms.

        Returns ``total_bpd`` and ``prior_bpd`` [N], and ``vb``, ``xstart_mse``, ``mse`` [N, T]
        whose column 0 is t = T-1, as the original's ``image_nll.py`` stores them.
        """
        noise_fn = noise_fn or torch.randn_like
        vb, xstart_mse, mse = [], [], []
        for step in samplers.reversed_steps(self.num_timesteps, progress):
            t = torch.full((x_start.shape[0],), step, device=x_start.device, dtype=torch.long)
            noise = noise_fn(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior = self.prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only ``use_timesteps`` of a base chain described by ``betas``.

    The respaced betas come from ratios of the base abar at the kept steps (not re-clipped).
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        base_betas = np.array(kwargs.pop("betas"), dtype=np.float64)
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        kept = sorted(self.use_timesteps)
        assert kept and kept[-1] < len(base_betas), "kept timesteps must lie inside the base chain"
        new_betas, last = [], 1.0
        for step in kept:
            new_betas.append(1 - base_alphas_cumprod[step] / last)
            last = base_alphas_cumprod[step]
        super().__init__(betas=np.array(new_betas), timestep_map=kept, original_num_steps=len(base_betas), **kwargs)
