"""Schedules, respacing, the importance sampler and the paper models' key layouts, exactly as the original."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import idiff
from idiff.diffusion import LossSecondMomentResampler, UniformSampler, get_named_beta_schedule, space_timesteps

REFERENCE = Path(__file__).parent / "reference"


@pytest.fixture(scope="module")
def schedules():
    return np.load(REFERENCE / "schedules.npz")


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 4000])
def test_beta_schedules_exact(schedules, name, steps):
    betas = get_named_beta_schedule(name, steps)
    assert betas.dtype == np.float64
    np.testing.assert_array_equal(betas, schedules[f"betas_{name}_{steps}"])


def test_respaced_chain_exact(schedules):
    base = idiff.create_gaussian_diffusion(steps=4000, noise_schedule="cosine")
    np.testing.assert_array_equal(base.alphas_cumprod, schedules["alphas_cumprod_cosine_4000"])
    spaced = idiff.create_gaussian_diffusion(steps=4000, noise_schedule="cosine", timestep_respacing="250")
    np.testing.assert_array_equal(spaced.betas, schedules["respaced_betas_cosine_4000_250"])
    np.testing.assert_array_equal(spaced.timestep_map, schedules["respaced_timestep_map_cosine_4000_250"])
    np.testing.assert_array_equal(spaced.alphas_cumprod, schedules["respaced_alphas_cumprod_cosine_4000_250"])
    assert spaced.num_timesteps == 250
    assert spaced.betas[-1] > 0.999  # respaced betas are not re-clipped


@pytest.mark.parametrize("case", json.loads((REFERENCE / "respacing.json").read_text()),
                         ids=lambda c: f"{c['section_counts']}@{c['num_timesteps']}")
def test_space_timesteps_exact(case):
    kept = space_timesteps(case["num_timesteps"], case["section_counts"])
    assert sorted(kept) == case["timesteps"]
    assert len(kept) == case["count"]


def test_respacing_rejects_impossible_counts():
    with pytest.raises(ValueError, match="evenly strided"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section"):
        space_timesteps(10, "20")


def test_loss_second_moment_sampler_events():
    ref = json.loads((REFERENCE / "sampler.json").read_text())
    num_timesteps = len(ref["snapshots"])
    diffusion = SimpleNamespace(num_timesteps=num_timesteps)
    sampler = LossSecondMomentResampler(diffusion)
    snapshots = iter(ref["snapshots"])
    events = ref["events"]
    for i, (t, loss) in enumerate(events):
        sampler.update_with_all_losses([t], [loss])
        last_of_timestep = i + 1 == len(events) or events[i + 1][0] != t
        if last_of_timestep:
            snap = next(snapshots)
            assert snap["after_timestep"] == t
            assert sampler._warmed_up() == snap["warmed_up"]
            np.testing.assert_allclose(sampler.weights(), snap["weights"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(sampler._loss_history, ref["final_loss_history"], rtol=1e-12)
    np.testing.assert_array_equal(sampler._loss_counts, ref["final_loss_counts"])
    np.testing.assert_array_equal(UniformSampler(diffusion).weights(),
                                  ref["uniform_sampler_weights"])


def test_sampler_state_survives_a_checkpoint(tmp_path):
    diffusion = SimpleNamespace(num_timesteps=4)
    sampler = LossSecondMomentResampler(diffusion)
    rng = np.random.default_rng(0)
    for _ in range(60):
        sampler.update_with_all_losses(rng.integers(0, 4, size=3), rng.random(3))
    torch.save(sampler.state_dict(), tmp_path / "s.pt")
    restored = LossSecondMomentResampler(diffusion)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    np.testing.assert_array_equal(restored.weights(), sampler.weights())
    assert restored._warmed_up() and not np.allclose(restored.weights(), 0.25)
    with pytest.raises(ValueError, match="diffusion_steps"):
        LossSecondMomentResampler(SimpleNamespace(num_timesteps=5)).load_state_dict(sampler.state_dict())


def test_importance_weights_and_inverse_cdf_sampling():
    diffusion = SimpleNamespace(num_timesteps=4)
    sampler = LossSecondMomentResampler(diffusion, history_per_term=1, uniform_prob=0.0)
    sampler.update_with_all_losses([0, 1, 2, 3], [1.0, 1.0, 1.0, 5.0])
    p = sampler.probabilities()
    np.testing.assert_allclose(p, [1 / 8, 1 / 8, 1 / 8, 5 / 8])
    t, w = sampler.sample_from_uniforms(np.array([0.0, 0.2, 0.3, 0.374, 0.376, 0.999]), "cpu")
    assert t.tolist() == [0, 1, 2, 2, 3, 3]
    torch.testing.assert_close(w, torch.tensor(1 / (4 * p[t.numpy()]), dtype=torch.float32))
    # Empirically, E[w * loss] over draws is the uniform mean of the losses: unbiased.
    t, w = sampler.sample_from_uniforms(np.random.default_rng(1).random(200_000), "cpu")
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert abs(float((w * losses[t]).mean()) - 2.5) < 0.02


KEY_FILES = sorted((REFERENCE / "keys").glob("*.json"))


@pytest.mark.parametrize("path", KEY_FILES, ids=lambda p: p.stem)
def test_paper_model_state_dict_layout(path):
    ref = json.loads(path.read_text())
    creator = getattr(idiff, ref["creator"])
    with torch.device("meta"):  # shapes only: the 280M-parameter models need no memory
        model, diffusion = creator(**ref["full_args"])
    assert type(model).__name__ == ref["model_class"]
    state = model.state_dict()
    assert [[k, list(v.shape)] for k, v in state.items()] == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"]
    assert diffusion.num_timesteps == ref["num_timesteps"]
    assert diffusion.loss_type.name == ref["loss_type"]
    assert diffusion.model_var_type.name == ref["model_var_type"]
    assert diffusion.model_mean_type.name == ref["model_mean_type"]
