"""Chains of specs (idiff-submit A B C, idiff validate --chain): every path a stage reads is written by an
earlier stage or exists, checked before anything is submitted; resource flags come from the Resources fields."""

from pathlib import Path

import pytest
from conftest import tiny_spec, write_spec

from idiff.cli import main as idiff_main
from idiff.jobspec.resources import Resources
from idiff.launch.commands import RESOURCE_FLAGS
from idiff.launch.commands import main as submit_main


@pytest.fixture
def chain(tmp_path, shapes_dir):
    """Specs of a tiny train -> sample -> evaluate chain, as dicts to edit, and where they go."""
    train = tiny_spec(shapes_dir, tmp_path / "runs" / "train", max_steps=4, save_interval=2)
    sample = {"kind": "sample", "name": "samples", "run_dir": str(tmp_path / "runs" / "samples"),
              "sample": {"from_run": str(tmp_path / "runs" / "train"), "num_samples": 8, "batch_size": 4,
                         "use_ddim": True, "timestep_respacing": "ddim5"}}
    evaluate = {"kind": "evaluate", "name": "scores", "run_dir": str(tmp_path / "runs" / "scores"),
                "evaluate": {"metrics": ["nll", "fid"], "from_run": str(tmp_path / "runs" / "train"),
                             "data_dir": shapes_dir, "num_samples": 4, "batch_size": 4,
                             "samples": str(tmp_path / "runs" / "samples" / "samples_8x16x16x3.npz"),
                             "reference": shapes_dir}}
    return {"train": train, "sample": sample, "evaluate": evaluate, "root": tmp_path}


def paths(chain, *names):
    return [write_spec(chain["root"] / f"{name}.yaml", chain[name]) for name in names]


def refused(capsys, run, argv, *messages) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err
    assert "Traceback" not in err
    return err


def test_a_chain_in_order_validates(capsys, chain):
    assert idiff_main(["validate", "--chain", *paths(chain, "train", "sample", "evaluate")]) == 0
    out = capsys.readouterr().out
    assert "stage 3 (" in out and "chain ok" in out
    assert not (chain["root"] / "runs").exists()  # validating writes nothing


def test_a_stage_reading_what_a_later_stage_writes_is_refused(capsys, chain):
    train, sample, evaluate = paths(chain, "train", "sample", "evaluate")
    refused(capsys, idiff_main, ["validate", "--chain", sample, train, evaluate],
            f"stage 1 ({sample}): sample.from_run", f"written by stage 2 ({train})", "comes first")


def test_a_path_nobody_writes_and_that_does_not_exist_is_refused(capsys, chain):
    chain["evaluate"]["evaluate"]["from_run"] = str(chain["root"] / "runs" / "trian")
    refused(capsys, idiff_main, ["validate", "--chain", *paths(chain, "train", "sample", "evaluate")],
            "stage 3", "evaluate.from_run", "trian does not exist and no earlier stage writes it")


def test_samples_must_be_the_file_the_sample_stage_collects(capsys, chain):
    chain["evaluate"]["evaluate"]["samples"] = str(chain["root"] / "runs" / "samples" / "samples_10x16x16x3.npz")
    refused(capsys, idiff_main, ["validate", "--chain", *paths(chain, "train", "sample", "evaluate")],
            "evaluate.samples", "writes", "samples_8x16x16x3.npz, not")
    chain["evaluate"]["evaluate"]["samples"] = chain["sample"]["run_dir"]  # the run dir names it too
    assert idiff_main(["validate", "--chain", *paths(chain, "train", "sample", "evaluate")]) == 0


def test_from_run_must_be_a_training_stage(capsys, chain):
    chain["evaluate"]["evaluate"]["from_run"] = chain["sample"]["run_dir"]
    refused(capsys, idiff_main, ["validate", "--chain", *paths(chain, "train", "sample", "evaluate")],
            "evaluate.from_run", "is not a training run dir", "is a sample job")


def test_two_stages_in_one_run_dir_are_refused(capsys, chain):
    chain["sample"]["run_dir"] = chain["train"]["run_dir"]
    refused(capsys, idiff_main, ["validate", "--chain", *paths(chain, "train", "sample")],
            "sample.from_run", "lies in this job's own run_dir", "choose another run_dir")
    second = {**chain["train"], "name": "again"}
    chain["again"] = second
    refused(capsys, idiff_main, ["validate", "--chain", *paths(chain, "train", "again")],
            "stage 2", "is also the run dir of stage 1")


def test_submit_refuses_a_broken_chain_before_submitting_anything(capsys, chain):
    chain["evaluate"]["evaluate"]["data_dir"] = str(chain["root"] / "no-such-data")
    refused(capsys, submit_main, paths(chain, "train", "sample", "evaluate"),
            "stage 3", "evaluate.data_dir", "does not exist")
    assert not (chain["root"] / "runs").exists()


def test_dry_run_chains_the_stages_and_flags_change_the_training_stage_only(capsys, chain):
    chain["sample"]["resources"] = {"nodes": 1, "timeout_min": 30}
    assert submit_main([*paths(chain, "train", "sample"), "--dry-run", "--nodes", "2", "--max-requeues", "3"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("# stage 2 (")
    assert "nodes: 2" in first and "max_requeues: 3" in first and "dependency" not in first
    assert "nodes: 1" in second and "max_requeues: 10" in second
    assert "dependency: afterok:<the job id of stage 1>" in second and "kill-on-invalid-dep: 'yes'" in second
    assert not (chain["root"] / "runs").exists()


def test_every_scalar_resource_field_is_a_flag():
    scalar = {name for name, field in Resources.model_fields.items() if name not in ("container", "slurm_extra",
                                                                                   "evaluate")}
    assert set(RESOURCE_FLAGS) == scalar


def test_a_chain_needs_slurm(capsys, chain):
    refused(capsys, submit_main, [*paths(chain, "train", "sample"), "--local"], "a chain of specs needs Slurm")
    assert not Path(chain["train"]["run_dir"]).exists()

