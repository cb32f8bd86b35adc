"""One source of defaults: the spec's sections. The drop-in API, the original's flags and jobs given by flags
alone take theirs from there; these tests fail when any of them grows a copy of its own."""

import argparse
import inspect
import json

import pytest
import torch
import yaml

import idiff
from idiff import factory
from idiff.cli import main as idiff_main
from idiff.cli import spec_from_job_arguments
from idiff.jobspec.flags import SECTIONS, add_flag_arguments, flag_fields
from idiff.jobspec.schema import DiffusionSection, EvaluateSection, ModelSection, SampleSection, TrainSection

# improved_diffusion.script_util.model_and_diffusion_defaults(): the drop-in API keeps these.
ORIGINAL_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions="16,8", dropout=0.0, learn_sigma=False, sigma_small=False, class_cond=False,
    diffusion_steps=1000, noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
    rescale_timesteps=True, rescale_learned_sigmas=True, use_checkpoint=False, use_scale_shift_norm=True,
)
SPEC_DEFAULTS = {**ModelSection().model_dump(), **DiffusionSection().model_dump()}
SIZES = ("large_size", "small_size")


def test_model_and_diffusion_defaults_are_the_originals_19_flags():
    defaults = idiff.model_and_diffusion_defaults()
    assert list(defaults) == list(ORIGINAL_DEFAULTS)
    assert defaults == ORIGINAL_DEFAULTS
    assert {k: type(v) for k, v in defaults.items()} == {k: type(v) for k, v in ORIGINAL_DEFAULTS.items()}


def test_model_and_diffusion_defaults_are_the_spec_field_defaults():
    assert idiff.model_and_diffusion_defaults() == {name: SPEC_DEFAULTS[name] for name in ORIGINAL_DEFAULTS}
    assert idiff.NUM_CLASSES == SPEC_DEFAULTS["num_classes"] == 1000


def test_super_res_defaults_differ_from_the_spec_only_in_the_documented_sizes():
    sr = idiff.sr_model_and_diffusion_defaults()
    assert set(sr) == (set(ORIGINAL_DEFAULTS) - {"image_size", "sigma_small"}) | set(SIZES)
    # The original's upsampler is 64 -> 256 px; in the spec no size means "not a super-resolution model".
    assert {k: sr[k] for k in SIZES} == factory.SUPER_RES_SIZE_DEFAULTS == {"large_size": 256, "small_size": 64}
    assert all(SPEC_DEFAULTS[k] is None for k in SIZES)
    assert {k: v for k, v in sr.items() if k not in SIZES} == {k: SPEC_DEFAULTS[k] for k in sr if k not in SIZES}


def test_create_gaussian_diffusion_defaults_are_the_spec_s_but_the_original_function_s_rescaling():
    parameters = inspect.signature(idiff.create_gaussian_diffusion).parameters
    defaults = {"diffusion_steps" if name == "steps" else name: p.default for name, p in parameters.items()}
    rescaling = {name: defaults.pop(name) for name in ("rescale_timesteps", "rescale_learned_sigmas")}
    # The original function defaults both to False although their flags default to True.
    assert rescaling == factory.GAUSSIAN_DIFFUSION_RESCALE_DEFAULTS == {"rescale_timesteps": False,
                                                                          "rescale_learned_sigmas": False}
    assert defaults == {name: SPEC_DEFAULTS[name] for name in defaults}


def test_create_model_has_no_defaults_of_its_own():
    """The original's create_model takes every flag; the extras idiff adds default in the spec."""
    for create in (idiff.create_model, idiff.sr_create_model):
        parameters = inspect.signature(create).parameters.values()
        assert all(p.default is inspect.Parameter.empty for p in parameters), create.__name__


@pytest.mark.parametrize("kind", SECTIONS)
def test_every_flag_leaves_the_spec_default_and_shows_it(kind):
    parser = argparse.ArgumentParser()
    add_flag_arguments(parser, kind)
    flags = {action.dest: action for action in parser._actions if action.dest.startswith("flag.")}
    assert len(flags) == len(flag_fields(kind))
    for name, (section, field) in flag_fields(kind).items():
        action = flags[f"flag.{section}.{name}"]
        assert action.default is argparse.SUPPRESS, name  # an absent flag leaves the spec's value
        default = "required" if field.is_required() else field.get_default(call_default_factory=True)
        assert action.help.endswith(f"default: {default}]"), (name, action.help)


# The fewest flags that make each kind of job; everything else must come out as the spec's default.
REQUIRED_FLAGS = {
    "train": (["--data_dir", "D", "--batch_size", "4", "--max_steps", "1"],
              TrainSection(data_dir="D", batch_size=4, max_steps=1)),
    "sample": (["--model_path", "m.pt"], SampleSection(model_path="m.pt")),
    "evaluate": (["--model_path", "m.pt", "--data_dir", "D"], EvaluateSection(model_path="m.pt", data_dir="D")),
}


@pytest.mark.parametrize("kind", REQUIRED_FLAGS)
def test_a_job_from_flags_alone_has_the_spec_defaults(kind):
    words, section = REQUIRED_FLAGS[kind]
    spec = spec_from_job_arguments(kind, words, "test")
    assert spec.model == ModelSection() and spec.diffusion == DiffusionSection()
    assert getattr(spec, kind) == section


def test_image_nll_py_s_job_computes_nll():
    spec = spec_from_job_arguments("evaluate", REQUIRED_FLAGS["evaluate"][0], "test")
    assert spec.evaluate.metrics == ["nll"]


# ----------------------------------------------------------------- --metrics in the original's plain flag form
TINY = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "8",
        "channel_mult": "1,2", "learn_sigma": True, "diffusion_steps": 10, "noise_schedule": "cosine"}


def test_metrics_flag_takes_a_name_or_a_comma_list(capsys):
    both = ["--metrics", "nll,fid", "--model_path", "m.pt", "--data_dir", "D", "--samples", "s.npz",
            "--reference", "r.npz"]
    assert spec_from_job_arguments("evaluate", both, "test").evaluate.metrics == ["nll", "fid"]
    assert idiff_main(["spec", "--from-flags", "evaluate", "--metrics", "nll", *both[2:6]]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["evaluate"]["metrics"] == ["nll"]
    yaml_form = EvaluateSection(metrics=" fid , inception_score", samples="s", reference="r")
    assert yaml_form.metrics == ["fid", "inception_score"]


@pytest.mark.parametrize("value,message", [("nll,bogus", "evaluate.metrics.1"), ("", "evaluate.metrics")])
def test_bad_metrics_flag_exits_2_naming_the_field(capsys, value, message):
    code = idiff_main(["spec", "--from-flags", "evaluate", "--metrics", value, "--model_path", "m.pt",
                       "--data_dir", "D"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_evaluate_with_the_originals_metrics_flag_runs_nll(tmp_path, shapes_dir, monkeypatch):
    torch.manual_seed(0)
    model, _ = idiff.create_model_and_diffusion(**TINY)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    run_dir = tmp_path / "nll"
    monkeypatch.setenv("OPENAI_LOGDIR", str(run_dir))
    flags = [word for name, value in TINY.items() for word in (f"--{name}", str(value))]
    code = idiff_main(["evaluate", "--metrics", "nll", "--model_path", str(tmp_path / "model.pt"), "--data_dir",
                       shapes_dir, "--num_samples", "2", "--batch_size", "2", *flags])
    assert code == 0
    nll = json.loads((run_dir / "eval" / "nll.json").read_text())
    assert nll["num_images"] == 2 and nll["num_timesteps"] == 10 and nll["bpd"] > 0
