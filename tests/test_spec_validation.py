"""Values that cannot run are refused by ``idiff validate`` (exit 2 naming the field), before any run dir exists:
seeds beyond 64 bits, duplicate YAML keys, booleans given for numbers, ``~``/``$VARS``/NUL in paths, a linear
schedule whose last beta is 1, evaluations beyond the run, sizes whose first allocation exceeds this machine's
memory, and a job that reads inputs from its own run dir (whose chain advice could never be followed)."""

import copy
from pathlib import Path

import pytest
import yaml
from conftest import TINY_MODEL, tiny_spec, write_spec

from idiff.cli import main as idiff_main
from idiff.jobspec.schema import physical_memory


@pytest.fixture
def train(tmp_path) -> dict:
    (tmp_path / "data").mkdir()
    return tiny_spec(tmp_path / "data", tmp_path / "run")


def sample(tmp_path, **fields) -> dict:
    return {"kind": "sample", "name": "s", "run_dir": str(tmp_path / "samples"), "model": dict(TINY_MODEL),
            "diffusion": {"diffusion_steps": 50}, "sample": {"model_path": str(tmp_path / "m.pt"), **fields}}


def refused(capsys, path, *messages, argv=("validate",)) -> None:
    assert idiff_main([*argv, str(path)]) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err
    assert "Traceback" not in err


def accepted(capsys, path) -> None:
    assert idiff_main(["validate", str(path)]) == 0, capsys.readouterr().err


def with_values(spec: dict, section: str, **values) -> dict:
    spec = copy.deepcopy(spec)
    spec[section].update(values)
    return spec


def test_seeds_beyond_64_bits_are_refused(capsys, tmp_path, train):
    refused(capsys, write_spec(tmp_path / "t.yaml", with_values(train, "train", seed=2**64)),
            "train.seed: Input should be less than or equal to 18446744073709551615")
    refused(capsys, write_spec(tmp_path / "s.yaml", sample(tmp_path, seed=2**70)), "sample.seed")
    accepted(capsys, write_spec(tmp_path / "ok.yaml", with_values(train, "train", seed=2**64 - 1)))


def test_a_key_given_twice_is_refused_naming_both_lines(capsys, tmp_path, train):
    text = yaml.safe_dump(train, sort_keys=False).replace("  batch_size: 8\n", "  batch_size: 8\n  batch_size: 64\n")
    (tmp_path / "t.yaml").write_text(text)
    first = text.splitlines().index("  batch_size: 8") + 1
    refused(capsys, tmp_path / "t.yaml", f"{tmp_path / 't.yaml'}:{first + 1}:", "duplicate key 'batch_size'",
            f"first on line {first}")


@pytest.mark.parametrize("section,field", [("train", "batch_size"), ("train", "max_steps"), ("model", "image_size"),
                                           ("diffusion", "diffusion_steps"), ("train", "microbatch")])
def test_a_boolean_is_not_taken_as_a_number(capsys, tmp_path, train, section, field):
    refused(capsys, write_spec(tmp_path / "t.yaml", with_values(train, section, **{field: True})),
            f"{field}: expected a number, got the boolean true")
    refused(capsys, write_spec(tmp_path / "ok.yaml", train), f"{field}: expected a number, got the boolean true",
            argv=("validate", "--set", f"{section}.{field}=true"))


def test_booleans_still_set_the_fields_that_take_them(capsys, tmp_path, train):
    accepted(capsys, write_spec(tmp_path / "t.yaml", with_values(train, "model", learn_sigma=True, class_cond=False)))
    accepted(capsys, write_spec(tmp_path / "s.yaml", sample(tmp_path, use_ema=False, use_ddim=True)))


@pytest.mark.parametrize("path,message", [
    ("~/data", "starts with ~, which idiff does not expand"),
    ("$HOME/data", "holds $HOME, which idiff does not expand"),
    ("/scratch/${USER}/data", "holds ${USER}, which idiff does not expand"),
    ("/data\x00/x", "contains a NUL byte"),
])
def test_paths_with_tilde_variables_or_nul_are_refused_naming_the_field(capsys, tmp_path, train, path, message):
    refused(capsys, write_spec(tmp_path / "t.yaml", with_values(train, "train", data_dir=path)),
            "train.data_dir: ", message)
    refused(capsys, write_spec(tmp_path / "r.yaml", {**train, "run_dir": path}), "run_dir: ", message)
    refused(capsys, write_spec(tmp_path / "s.yaml", sample(tmp_path, model_path=path)), "sample.model_path: ", message)
    assert not Path("~").exists()


def test_a_linear_schedule_whose_last_beta_is_1_is_refused(capsys, tmp_path, train):
    """T = 20: beta_T = 0.02 * 1000 / 20 = 1, which leaves no signal (every sample came out 0)."""
    refused(capsys, write_spec(tmp_path / "t.yaml", with_values(train, "diffusion", diffusion_steps=20,
                                                                noise_schedule="linear")),
            "the linear schedule with diffusion_steps 20 has betas up to 1; each must lie in (0, 1)")
    accepted(capsys, write_spec(tmp_path / "ok.yaml", with_values(train, "diffusion", diffusion_steps=21,
                                                                  noise_schedule="linear")))


def test_evaluations_beyond_the_run_are_refused(capsys, tmp_path, train):
    spec = with_values(train, "train", evaluate={"every": 16, "metrics": "nll", "data_dir": str(tmp_path / "data")})
    refused(capsys, write_spec(tmp_path / "t.yaml", spec), "evaluate.every (16) is beyond the run's 12 steps")


@pytest.mark.skipif(physical_memory() is None, reason="this system does not say how much memory it has")
def test_sizes_whose_first_allocation_cannot_fit_this_machine_are_refused(capsys, tmp_path, train):
    batch = physical_memory() // (4 * 3 * 16 * 16) + 1  # the images alone are more than the memory
    refused(capsys, write_spec(tmp_path / "t.yaml", with_values(train, "train", batch_size=batch)),
            f"train.batch_size {batch} with model.image_size 16", "more than this machine's")
    refused(capsys, write_spec(tmp_path / "s.yaml", sample(tmp_path, batch_size=batch)), "sample.batch_size")


def test_a_stage_reading_its_own_run_dir_is_told_a_fix_that_exists(capsys, tmp_path):
    spec = sample(tmp_path, model_path=None, from_run=str(tmp_path / "samples"))
    del spec["model"]
    path = write_spec(tmp_path / "s.yaml", spec)
    for argv in (("validate",), ("validate", "--chain")):
        refused(capsys, path, "sample.from_run", "lies in this job's own run_dir", "choose another run_dir",
                argv=argv)
