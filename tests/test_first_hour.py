"""A new user's first hour: messages that point at the cause, and answers where a bare error was."""

import pytest
from conftest import idiff_in_process, tiny_spec, write_spec

DEMO = "jobs/demo.yaml"


def refused(*args) -> str:
    result = idiff_in_process(*args, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_an_error_in_a_set_value_names_the_set_argument_not_a_line_of_the_file():
    err = refused("validate", DEMO, "--set", "train.lr=abc")
    assert "--set 'train.lr=abc': train.lr: Input should be a valid number" in err
    assert "line " not in err


@pytest.mark.parametrize(("given", "meant"), [
    ("train.learning_rate=2e-4", "did you mean 'lr'?"),         # another tool's name, an alias of the field
    ("model.model_channels=64", "did you mean 'num_channels'?"),
    ("diffusion.timesteps=100", "did you mean 'diffusion_steps'?"),
    ("train.num_channels=64", "num_channels belongs in model.num_channels"),  # the right key, the wrong section
    ("train.lrr=1", "did you mean 'lr'?"),                       # a typo
])
def test_did_you_mean_knows_aliases_and_sections(given, meant):
    assert meant in refused("validate", DEMO, "--set", given)


def test_status_without_a_run_dir_lists_the_runs_below_or_says_what_it_needs(tmp_path, shapes_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "no run dir in" in refused("status") and "idiff status runs/demo" in refused("status")
    spec = tiny_spec(shapes_dir, "runs/tiny", max_steps=2, save_interval=2, num_workers=0)
    idiff_in_process("train", write_spec(tmp_path / "tiny.yaml", spec))
    (tmp_path / "runs" / "not-a-run").mkdir()
    out = idiff_in_process("status").stdout
    assert out.startswith("runs/tiny: train; last log: step 2/2 (100.0%)"), out
    assert "not-a-run" not in out
    assert "img/s over the last 1 steps" in idiff_in_process("status", "runs/tiny").stdout  # which rate it is


def test_help_names_what_from_flags_takes_and_speaks_english(capsys):
    from idiff.cli import make_parser

    parser = make_parser()
    assert "run an evaluate job" in parser.format_help()
    spec_help = next(a for a in parser._actions if a.dest == "command").choices["spec"].format_help()
    assert "--from-flags {train,sample,evaluate}" in spec_help
