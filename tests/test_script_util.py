"""idiff as a drop-in for the original's ``improved_diffusion.script_util``: the names its scripts import,
used the way image_sample.py, image_nll.py and image_train.py use them."""

import argparse

import pytest
import torch

import idiff
from idiff import (
    NUM_CLASSES,
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    str2bool,
)

SCRIPT_UTIL_NAMES = ["NUM_CLASSES", "model_and_diffusion_defaults", "create_model_and_diffusion", "create_model",
                     "create_gaussian_diffusion", "sr_model_and_diffusion_defaults", "sr_create_model_and_diffusion",
                     "sr_create_model", "add_dict_to_argparser", "args_to_dict", "str2bool"]

# A tiny model on a 3-step respaced chain: what image_sample.py's flags say, small enough for a unit test.
TINY_FLAGS = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "1", "--attention_resolutions", "8",
              "--learn_sigma", "True", "--noise_schedule", "cosine", "--timestep_respacing", "3", "--dropout", "0.1"]


def image_sample_args(argv):
    """image_sample.py's create_argparser(): its own flags and the model's, all from one defaults dict."""
    defaults = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path="")
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, defaults)
    return parser.parse_args(argv)


def model_and_diffusion(args):
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    with torch.no_grad():  # the output layer starts at zero: perturb it so that the model's output matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), diffusion


def test_the_package_offers_everything_script_util_offers():
    assert sorted(idiff.__all__) == sorted(SCRIPT_UTIL_NAMES)
    for name in SCRIPT_UTIL_NAMES:
        assert getattr(idiff, name) is not None, name
    assert NUM_CLASSES == 1000


def test_flags_parse_to_the_types_of_their_defaults():
    args = image_sample_args([*TINY_FLAGS, "--use_ddim", "False", "--num_samples", "8", "--model_path", "m.pt"])
    assert args.learn_sigma is True and args.use_ddim is False and args.clip_denoised is True
    assert args.num_channels == 32 and args.num_samples == 8 and args.dropout == 0.1
    assert args.attention_resolutions == "8" and args.timestep_respacing == "3" and args.model_path == "m.pt"
    flags = args_to_dict(args, model_and_diffusion_defaults().keys())
    assert list(flags) == list(model_and_diffusion_defaults())
    assert flags["rescale_timesteps"] is True  # not given: the default


def test_a_none_default_takes_the_string_given():
    parser = argparse.ArgumentParser()
    add_dict_to_argparser(parser, {"base_samples": None, "lr": 1e-4, "microbatch": -1})
    args = parser.parse_args(["--base_samples", "low.npz", "--lr", "3e-4"])
    assert args_to_dict(args, ["base_samples", "lr", "microbatch"]) == {"base_samples": "low.npz", "lr": 3e-4,
                                                                        "microbatch": -1}


def test_a_bad_boolean_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        image_sample_args(["--use_ddim", "maybe"])
    assert exit_.value.code == 2
    assert "boolean value expected, got 'maybe'" in capsys.readouterr().err


@pytest.mark.parametrize("use_ddim", [False, True])
def test_image_sample_draws_class_conditional_images(use_ddim):
    args = image_sample_args([*TINY_FLAGS, "--class_cond", "True", "--use_ddim", str(use_ddim), "--batch_size", "2"])
    model, diffusion = model_and_diffusion(args)
    assert model.out[-1].out_channels == 6  # learn_sigma
    assert diffusion.num_timesteps == 3
    classes = torch.randint(low=0, high=NUM_CLASSES, size=(args.batch_size,))
    sample_fn = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    sample = sample_fn(model, (args.batch_size, 3, args.image_size, args.image_size),
                       clip_denoised=args.clip_denoised, model_kwargs={"y": classes})
    assert sample.shape == (2, 3, 32, 32) and torch.isfinite(sample).all()


@torch.no_grad()
def test_p_sample_loop_is_p_sample_from_t_minus_1_down_to_0():
    model, diffusion = model_and_diffusion(image_sample_args(TINY_FLAGS))
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # both draw each step's noise from the global generator, as the original does
    looped = diffusion.p_sample_loop(model, x_T.shape, noise=x_T)
    torch.manual_seed(2)
    x, steps = x_T, []
    for step in reversed(range(diffusion.num_timesteps)):
        out = diffusion.p_sample(model, x, torch.full((2,), step))
        steps.append(out["sample"])
        x = out["sample"]
    torch.testing.assert_close(looped, x, rtol=0, atol=0)
    assert len(steps) == 3 and not torch.equal(steps[0], x_T)
    # The last step adds no noise: x_0 is the mean of p(x_0 | x_1).
    mean = diffusion.p_mean_variance(model, steps[-2], torch.zeros(2, dtype=torch.long))["mean"]
    torch.testing.assert_close(x, mean, rtol=0, atol=0)


@pytest.mark.parametrize("word", ["yes", "true", "t", "y", "1", "True", "YES"])
def test_str2bool_true(word):
    assert str2bool(word) is True


@pytest.mark.parametrize("word", ["no", "false", "f", "n", "0", "False", "NO"])
def test_str2bool_false(word):
    assert str2bool(word) is False


@pytest.mark.parametrize("word", ["maybe", "", "2", "on", "off"])
def test_str2bool_refuses_other_words(word):
    with pytest.raises(argparse.ArgumentTypeError, match="boolean value expected"):
        str2bool(word)
