"""UNet behaviour beyond the golden numbers: errors, precision, checkpointing, other sizes."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import idiff
from idiff.models import ArchitectureMismatch

TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, learn_sigma=True, noise_schedule="cosine",
            diffusion_steps=100)


def perturbed(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_defaults_are_the_originals_19_flags():
    defaults = idiff.model_and_diffusion_defaults()
    assert len(defaults) == 19
    assert defaults["num_channels"] == 128 and defaults["rescale_learned_sigmas"] is True
    sr = idiff.sr_model_and_diffusion_defaults()
    assert sr["large_size"] == 256 and sr["small_size"] == 64 and "image_size" not in sr


def test_unknown_flag_is_named_with_a_suggestion():
    with pytest.raises(TypeError, match=r"'num_chanels'.*did you mean 'num_channels'"):
        idiff.create_model_and_diffusion(num_chanels=64)


def test_image_size_without_default_channel_mult_asks_for_it():
    with pytest.raises(ValueError, match="channel_mult"):
        idiff.create_model_and_diffusion(image_size=128)


@pytest.mark.parametrize("size,mult", [(16, "1,2"), (128, "1,1,2,3,4")])
def test_explicit_channel_mult_for_other_sizes(size, mult):
    model, _ = idiff.create_model_and_diffusion(image_size=size, num_channels=32, num_res_blocks=1,
                                                attention_resolutions="8", channel_mult=mult)
    x = torch.randn(1, 3, size, size)
    assert model(x, torch.tensor([3.0])).shape == x.shape
    assert len(model.output_blocks) == len(mult.split(",")) * 2


def test_mismatched_checkpoint_names_keys_and_flags():
    source, _ = idiff.create_model_and_diffusion(**{**TINY, "learn_sigma": False, "class_cond": True,
                                                    "num_classes": 10})
    target, _ = idiff.create_model_and_diffusion(**TINY)
    with pytest.raises(ArchitectureMismatch) as err:
        target.load_state_dict(source.state_dict())
    message = str(err.value)
    assert "unexpected keys: label_emb.weight" in message
    assert "mis-shaped: out.2.weight: checkpoint [3, 32, 3, 3] vs model [6, 32, 3, 3]" in message
    assert "learn_sigma (checkpoint: False, model: True)" in message
    assert "class_cond (checkpoint: True, model: False)" in message

    wide, _ = idiff.create_model_and_diffusion(**{**TINY, "num_channels": 64, "use_scale_shift_norm": False})
    with pytest.raises(ArchitectureMismatch, match="num_channels \\(checkpoint: 64, model: 32\\)") as err:
        target.load_state_dict(wide.state_dict())
    assert "use_scale_shift_norm (checkpoint: False, model: True)" in str(err.value)


def test_class_labels_are_added_to_the_time_embedding():
    model, _ = idiff.create_model_and_diffusion(**{**TINY, "class_cond": True, "num_classes": 7})
    perturbed(model).eval()
    assert model.label_emb.weight.shape == (7, 128)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 10.0])
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([0, 0]))
        b = model(x, t, y=torch.tensor([0, 5]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)


def test_fresh_model_outputs_zero():
    model, _ = idiff.create_model_and_diffusion(**TINY)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([1.0, 50.0]))
    assert torch.count_nonzero(out) == 0


def test_super_res_model_sees_the_upsampled_low_res_image():
    model, diffusion = idiff.sr_create_model_and_diffusion(large_size=64, small_size=32, num_channels=32,
                                                           num_res_blocks=1, learn_sigma=True)
    perturbed(model).eval()
    assert model.input_blocks[0][0].weight.shape[1] == 6
    x = torch.randn(2, 3, 64, 64)
    low = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([1.0, 2.0]), low_res=low)
        other = model(x, torch.tensor([1.0, 2.0]), low_res=low.flip(-1))
    assert out.shape == (2, 6, 64, 64) and not torch.allclose(out, other)
    losses = diffusion.training_losses(model, x.clamp(-1, 1), torch.tensor([0, 500]), model_kwargs={"low_res": low})
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain, diffusion = idiff.create_model_and_diffusion(**TINY)
    perturbed(plain)
    ckpt, _ = idiff.create_model_and_diffusion(**{**TINY, "use_checkpoint": True})
    ckpt.load_state_dict(plain.state_dict())
    x, t, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([3, 70]), torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        diffusion.training_losses(model, x, t, noise=noise)["loss"].mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_under_autocast_with_float32_group_norm(dtype):
    model, diffusion = idiff.create_model_and_diffusion(**TINY)
    perturbed(model)
    x, t, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([3, 70]), torch.randn(2, 3, 32, 32)
    reference = diffusion.training_losses(model, x, t, noise=noise)["loss"]
    seen = []
    hook = model.middle_block[0].in_layers[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=dtype):
        loss = diffusion.training_losses(model, x, t, noise=noise)["loss"]
    hook.remove()
    loss.mean().backward()
    assert seen == [dtype]  # normalised in fp32, handed back in the autocast dtype
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=0.05, atol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_ddim_reverse_step_moves_to_t_plus_1_along_the_predicted_noise():
    model, diffusion = idiff.create_model_and_diffusion(**TINY)
    perturbed(model).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 60])
    with torch.no_grad():
        out = diffusion.ddim_reverse_sample(model, x, t)
        pmv = diffusion.p_mean_variance(model, x, t)
    eps = diffusion._predict_eps_from_xstart(x, t, pmv["pred_xstart"])
    abar_next = torch.tensor(diffusion.alphas_cumprod[t.numpy() + 1], dtype=torch.float32).view(-1, 1, 1, 1)
    torch.testing.assert_close(out["sample"], pmv["pred_xstart"] * abar_next.sqrt() + (1 - abar_next).sqrt() * eps)
    with pytest.raises(AssertionError):
        diffusion.ddim_reverse_sample(model, x, t, eta=0.5)


def test_loss_aware_sampler_is_fed_the_batch_in_order():
    from idiff.diffusion import LossSecondMomentResampler
    from idiff.train.inputs import feed_timestep_sampler

    sampler = LossSecondMomentResampler(SimpleNamespace(num_timesteps=2), history_per_term=2)
    feed_timestep_sampler(sampler, t=torch.tensor([0, 1, 0, 1]), losses=torch.tensor([1.0, 3.0, 2.0, 4.0]), rank=0,
                 world_size=1)
    assert sampler._warmed_up()
    np.testing.assert_array_equal(sampler._loss_history, [[1.0, 2.0], [3.0, 4.0]])
