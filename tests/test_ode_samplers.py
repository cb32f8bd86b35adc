"""The ODE samplers (DPM-Solver++ 2M/3M, Heun, UniPC, iPNDM): convergence against exact and reference solutions, DDIM as
DPM-Solver++(1), and the spec fields that choose a sampler."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import idiff
from idiff.cli import main as idiff_main
from idiff.diffusion import samplers
from idiff.diffusion.draw import draw_samples
from idiff.diffusion.ode_samplers import SPACINGS, chain_start, dpm_solver_pp
from idiff.factory import create_gaussian_diffusion

ORDERS = {"dpmpp_2m": 2, "dpmpp_3m": 3, "heun": 2, "unipc": 3, "ipndm": 4}  # at their default options
# (sampler, options, nominal order): UniPC's corrector adds one to its predictor's order.
NOMINAL_ORDERS = [("dpmpp_2m", {}, 2), ("dpmpp_3m", {}, 3), ("heun", {}, 2),
                  ("unipc", {"order": 1, "variant": "bh1"}, 2), ("unipc", {"order": 2, "variant": "bh1"}, 3),
                  ("unipc", {"order": 2, "variant": "bh2"}, 3), ("unipc", {"order": 3, "variant": "bh2"}, 4),
                  ("ipndm", {"order": 2}, 2), ("ipndm", {"order": 3}, 3), ("ipndm", {"order": 4}, 4)]


class GaussianData:
    """Data x_0 ~ N(mu, s^2) per pixel: the exact x_0 prediction is linear in x_t, and the probability-flow ODE keeps
    (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed, so its solution is known in closed form. As a model it
    answers at the (fractional) timestep it is fed, through the schedule the samplers interpolate."""

    def __init__(self, diffusion, shape=(3, 4, 4), seed=0):
        self.diffusion = diffusion
        gen = torch.Generator().manual_seed(seed)
        self.mu = torch.rand(1, *shape, generator=gen, dtype=torch.float64) * 1.2 - 0.6
        self.std = torch.rand(1, *shape, generator=gen, dtype=torch.float64) * 0.4 + 0.1

    def levels(self, t):
        alpha_bar = self.diffusion.alpha_bar_at(float(t))
        return math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)

    def x_start(self, x, t):
        alpha, sigma = self.levels(t)
        return self.mu + alpha * self.std**2 / (alpha**2 * self.std**2 + sigma**2) * (x - alpha * self.mu)

    def eps_model(self, x, timesteps):
        """An epsilon model with a learned-variance half that the ODE must ignore."""
        alpha, sigma = self.levels(timesteps[0])
        eps = (x - alpha * self.x_start(x, timesteps[0])) / sigma
        return torch.cat([eps, torch.full_like(eps, 1e3)], dim=1)

    def exact(self, x_T):
        """The ODE from the grids' start, where x_T arrives as (s_start / s_(K-1)) x_T, to step 0, then the final
        step to x_0 that every sampler takes."""
        start, last = chain_start(self.diffusion), self.diffusion.num_timesteps - 1
        (a_T, s_T), (a_0, s_0) = self.levels(start), self.levels(0)
        x_start = s_T / self.levels(last)[1] * x_T
        z = (x_start - a_T * self.mu) / torch.sqrt(a_T**2 * self.std**2 + s_T**2)
        return self.x_start(a_0 * self.mu + torch.sqrt(a_0**2 * self.std**2 + s_0**2) * z, 0)


def gaussian_problem(schedule, steps, **diffusion_flags):
    # rescale_timesteps off: the model is fed the chain time itself, which the analytic model reads back.
    diffusion = create_gaussian_diffusion(steps=steps, noise_schedule=schedule, learn_sigma=True,
                                          rescale_timesteps=False, **diffusion_flags)
    data = GaussianData(diffusion)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return diffusion, data, x_T


def run(name, diffusion, model, x, **options):
    return samplers.sample(name, diffusion, model, x, clip_denoised=False, **options)


def max_errors(name, spacing, nfes, problem, **options):
    diffusion, data, x_T = problem
    exact = data.exact(x_T)
    return [float((run(name, diffusion, data.eps_model, x_T, steps=n, spacing=spacing, **options) - exact).abs().max())
            for n in nfes]


@pytest.mark.parametrize("name", ORDERS)
def test_steps_is_the_number_of_model_evaluations(name):
    diffusion, data, x_T = gaussian_problem("cosine", 100)
    times = []

    def counting_model(x, timesteps):
        times.append(float(timesteps[0]))
        return data.eps_model(x, timesteps)

    for steps in (4, 5, 20, 99):  # time_uniform spaces steps 0..98: at most 99
        times.clear()
        run(name, diffusion, counting_model, x_T, steps=steps, spacing="time_uniform")
        assert len(times) == steps
        # From the grids' start (the last step above lambda -5.1: the cosine schedule's step 99 lies at -7.6) down
        # to step 0, where x_0 is predicted.
        assert times[0] == chain_start(diffusion) == 98 and times[-1] == 0


@pytest.mark.parametrize("name", ORDERS)
def test_the_grid_starts_below_the_clipped_noise_levels_with_x_T_carried_there(name):
    diffusion, data, x_T = gaussian_problem("cosine", 100)
    inputs = []

    def recording_model(x, timesteps):
        inputs.append((float(timesteps[0]), x.clone()))
        return data.eps_model(x, timesteps)

    run(name, diffusion, recording_model, x_T.clone(), steps=6)
    s_98, s_99 = (data.levels(t)[1] for t in (98, 99))
    assert inputs[0][0] == 98
    torch.testing.assert_close(inputs[0][1], x_T * (s_98 / s_99), atol=1e-12, rtol=0)
    if name != "heun":  # without steps the multistep solvers step through the whole chain, as DDIM does
        inputs.clear()
        run(name, diffusion, recording_model, x_T.clone())
        assert inputs[0][0] == 99 and torch.equal(inputs[0][1], x_T)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", ORDERS)
def test_error_to_the_exact_solution_falls_as_nfe_grows(name, spacing):
    errors = max_errors(name, spacing, [16, 32, 64], gaussian_problem("cosine", 100))
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("spacing", ["logsnr_uniform", "karras"])
@pytest.mark.parametrize("name, options, nominal", NOMINAL_ORDERS)
def test_every_solver_converges_at_its_nominal_order(name, options, nominal, spacing):
    nfes = [64, 128, 256]  # the error ratio as NFE doubles: iPNDM of order 4 reaches 3.7 only from 64 on
    errors = max_errors(name, spacing, nfes, gaussian_problem("linear", 1000), **options)
    slopes = [math.log(errors[i] / errors[i + 1]) / math.log(nfes[i + 1] / nfes[i]) for i in range(2)]
    assert min(slopes) >= nominal - 0.35 and slopes[-1] >= nominal - 0.2, (errors, slopes)


def test_an_x_start_model_solves_the_same_ode_as_an_eps_model():
    diffusion, data, x_T = gaussian_problem("cosine", 100)
    x_start_diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine", predict_xstart=True,
                                                  rescale_timesteps=False)

    def x_start_model(x, timesteps):
        return data.x_start(x, timesteps[0])

    for name in ORDERS:
        from_eps = run(name, diffusion, data.eps_model, x_T, steps=12, spacing="karras")
        from_x_start = run(name, x_start_diffusion, x_start_model, x_T, steps=12, spacing="karras")
        # Not closer: the model reads its timestep as float32, so the two conversions see abar to ~1e-7.
        torch.testing.assert_close(from_x_start, from_eps, atol=1e-6, rtol=0)


def tiny_unet(seed=0, **flags):
    """A tiny class-conditional UNet that computes something: its zero-initialised layers get random weights,
    and its timestep embedding keeps only the slow frequencies, so that it is smooth across chain steps."""
    torch.manual_seed(seed)
    model, diffusion = idiff.create_model_and_diffusion(**{
        "image_size": 8, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "4", "channel_mult": "1,2",
        "learn_sigma": True, "class_cond": True, "num_classes": 3, "diffusion_steps": 50, "noise_schedule": "cosine",
        **flags})
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.05)
        half = model.model_channels // 2
        frequencies = torch.exp(-math.log(10000) * torch.arange(half) / half).repeat(2)
        model.time_embed[0].weight[:, frequencies > 0.01] = 0
    return model.eval(), diffusion


@pytest.mark.slow  # about 1,200 UNet evaluations: a 400-step reference and four samplers at four NFEs
def test_on_a_tiny_unet_every_sampler_approaches_the_reference_as_nfe_grows():
    model, diffusion = tiny_unet()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"model_kwargs": {"y": torch.tensor([0, 2])}, "clip_denoised": True}
    reference = samplers.sample("dpmpp_3m", diffusion, model, x_T, steps=400, spacing="logsnr_uniform", **kwargs)
    for name in ("ddim_ode", *ORDERS):
        errors = []
        for nfe in (6, 12, 24, 48):
            if name == "ddim_ode":
                x_0 = list(dpm_solver_pp(diffusion, model, x_T, order=1, steps=nfe, spacing="logsnr_uniform",
                                         **kwargs))[-1]["sample"]
            else:
                x_0 = samplers.sample(name, diffusion, model, x_T, steps=nfe, spacing="logsnr_uniform", **kwargs)
            errors.append(float((x_0 - reference).abs().mean()))
        assert all(a > b for a, b in itertools.pairwise(errors)), (name, errors)


@pytest.mark.parametrize("respacing", ["", "ddim10"])
@pytest.mark.parametrize("clip", [True, False])
def test_dpm_solver_pp_of_order_1_is_ddim(respacing, clip):
    model, diffusion = tiny_unet(timestep_respacing=respacing)
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"model_kwargs": {"y": torch.tensor([0, 1, 2])}, "clip_denoised": clip}
    ddim = list(samplers.ddim(diffusion, model, x_T, **kwargs))
    first_order = list(dpm_solver_pp(diffusion, model, x_T, order=1, **kwargs))  # no steps: the chain's own
    assert len(ddim) == len(first_order) == diffusion.num_timesteps
    scale = float(ddim[-1]["sample"].abs().max())
    for step_ddim, step_dpm in zip(ddim, first_order):
        torch.testing.assert_close(step_dpm["sample"], step_ddim["sample"], atol=1e-5 * max(scale, 1), rtol=0)
    assert not torch.allclose(ddim[-1]["sample"], x_T, atol=0.1)  # the model did move the samples


@pytest.mark.parametrize("name", ORDERS)
def test_a_sample_depends_on_its_index_only_and_a_super_resolution_model_on_its_low_res_input(name):
    model, diffusion = tiny_unet()
    options = {"seed": 3, "image_size": 8, "sampler": name, "sampler_options": {"steps": 5, "spacing": "karras"}}
    batch, _ = draw_samples(model, diffusion, [0, 1, 2, 3], labels=[0, 1, 2, 0], **options)
    alone, _ = draw_samples(model, diffusion, [2], labels=[2], **options)
    # Kernels round differently per batch size, and Heun's first step (sigma of x / alpha from ~1e3 down) scales
    # that rounding up by sigma_max / sigma_1; another x_T or label would differ by O(1).
    torch.testing.assert_close(alone[0], batch[2], atol=1e-3, rtol=0)

    torch.manual_seed(0)
    upsampler, sr_diffusion = idiff.sr_create_model_and_diffusion(
        large_size=8, small_size=4, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
        learn_sigma=True, diffusion_steps=50, noise_schedule="cosine")
    with torch.no_grad():
        upsampler.out[-1].weight.normal_(0, 0.05)
    low_res = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    first, _ = draw_samples(upsampler.eval(), sr_diffusion, [0, 1], low_res=low_res, **options)
    again, _ = draw_samples(upsampler, sr_diffusion, [0, 1], low_res=low_res, **options)
    other, _ = draw_samples(upsampler, sr_diffusion, [0, 1], low_res=-low_res, **options)
    assert torch.equal(first, again)  # deterministic: no noise is drawn after x_T
    assert (first - other).abs().mean() > 0.01


# ------------------------------------------------------------------------------------------- the spec fields
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny model saved as a released checkpoint, with the flags a spec gives for it."""
    root = tmp_path_factory.mktemp("ode")
    model, _ = tiny_unet()
    torch.save(model.state_dict(), root / "tiny.pt")
    flags = {"image_size": 8, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "4",
             "channel_mult": "1,2", "learn_sigma": True, "class_cond": True, "num_classes": 3}
    return {"root": root, "model": flags, "diffusion": {"diffusion_steps": 50, "noise_schedule": "cosine"},
            "path": str(root / "tiny.pt")}


def sample_spec(released, name, **sample):
    spec = {"kind": "sample", "name": name, "run_dir": str(released["root"] / name), "model": released["model"],
            "diffusion": released["diffusion"],
            "sample": {"model_path": released["path"], "num_samples": 3, "batch_size": 3, "class_labels": "balanced",
                       **sample}}
    path = released["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path), released["root"] / name


def images(run_dir):
    with np.load(next(Path(run_dir).glob("samples_*.npz"))) as data:
        return data["arr_0"]


def test_use_ddim_and_timestep_respacing_mean_what_sampler_ddim_and_steps_mean(released, capsys):
    old, old_dir = sample_spec(released, "old-fields", use_ddim=True, timestep_respacing="7")
    new, new_dir = sample_spec(released, "new-fields", sampler="ddim", steps=7)
    assert idiff_main(["validate", old, new]) == 0
    assert "ddim 7" in capsys.readouterr().out
    assert idiff_main(["sample", old]) == 0 and idiff_main(["sample", new]) == 0
    assert np.array_equal(images(old_dir), images(new_dir))

    ode, ode_dir = sample_spec(released, "ode", sampler="dpmpp_2m", steps=7, spacing="logsnr_uniform")
    assert idiff_main(["sample", ode]) == 0
    assert images(ode_dir).shape == (3, 8, 8, 3) and not np.array_equal(images(ode_dir), images(new_dir))


def test_the_spec_chooses_unipc_s_order_and_variant(released):
    drawn = {}
    for name, fields in {"bh1": {"unipc_variant": "bh1"}, "bh2": {}, "order1": {"solver_order": 1}}.items():
        spec, run_dir = sample_spec(released, f"unipc-{name}", sampler="unipc", steps=6, **fields)
        assert idiff_main(["sample", spec]) == 0
        drawn[name] = images(run_dir)
    assert not np.array_equal(drawn["bh1"], drawn["bh2"]) and not np.array_equal(drawn["order1"], drawn["bh2"])


BAD_SAMPLE_FIELDS = {  # case: (sample fields, messages)
    "unknown sampler": ({"sampler": "euler_a"}, ["sample.sampler: Input should be 'ancestral', 'ddim', 'dpmpp_2m'"]),
    "no steps": ({"sampler": "heun", "steps": 0}, ["sample.steps: Input should be greater than 0"]),
    "too few for the order": ({"sampler": "dpmpp_3m", "steps": 3}, ["sample.steps: dpmpp_3m needs at least 4 steps"]),
    "use_ddim with another sampler": ({"use_ddim": True, "sampler": "dpmpp_2m"},
                                      ["sample.sampler: use_ddim: true means sampler ddim, not dpmpp_2m"]),
    "use_ddim false with ddim": ({"use_ddim": False, "sampler": "ddim"},
                                 ["sample: use_ddim: false contradicts sampler: ddim"]),
    "steps and a respacing": ({"sampler": "heun", "timestep_respacing": "25", "steps": 9},
                              ["sample.steps: steps and timestep_respacing both choose the sampling steps"]),
    "spacing for ddim": ({"sampler": "ddim", "steps": 9, "spacing": "karras"},
                         ["sample.spacing: karras spacing is for the ODE solvers"]),
    "eta for an ODE solver": ({"sampler": "dpmpp_2m", "eta": 0.5}, ["sample.sampler: dpmpp_2m draws no noise"]),
    "an order UniPC lacks": ({"sampler": "unipc", "solver_order": 4},
                             ["sample.solver_order: unipc takes orders 1 to 3, got 4"]),
    "an order for a fixed-order solver": ({"sampler": "dpmpp_2m", "solver_order": 2},
                                          ["sample.solver_order: solver_order is for unipc and ipndm, not dpmpp_2m"]),
    "an unknown B(h)": ({"sampler": "unipc", "unipc_variant": "bh3"}, ["sample.unipc_variant: Input should be"]),
}


@pytest.mark.parametrize("case", BAD_SAMPLE_FIELDS)
def test_bad_sampler_fields_exit_2_naming_the_field(released, case, capsys):
    fields, messages = BAD_SAMPLE_FIELDS[case]
    spec, run_dir = sample_spec(released, "bad", **fields)
    assert idiff_main(["validate", spec]) == 2
    assert idiff_main(["sample", spec]) == 2
    err = capsys.readouterr().err
    assert all(message in err for message in messages), err
    assert "Traceback" not in err and not run_dir.exists()


@pytest.mark.parametrize("fields, message", [
    ({"sampler": "dpmpp_2m", "steps": 51}, "sample.steps: 51 is more than the model's diffusion_steps (50)"),
    ({"sampler": "ddim", "steps": 51}, "sample.steps: 51 is more than the model's diffusion_steps (50)"),
    ({"sampler": "dpmpp_3m", "timestep_respacing": "3"},
     "sample.timestep_respacing: the chain has 3 steps, but dpmpp_3m needs at least 4"),
])
def test_steps_the_model_does_not_have_exit_2_before_the_run_dir_is_made(released, fields, message, capsys):
    spec, run_dir = sample_spec(released, "too-many", **fields)
    assert idiff_main(["sample", spec]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not run_dir.exists()
