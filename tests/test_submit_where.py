"""Where a submission goes is never a surprise: without a reachable Slurm, idiff-submit refuses unless told
--local; every submission and dry run says where it goes; a dry run checks what the real one checks."""

import os
import sys
from pathlib import Path

import pytest
from conftest import tiny_spec, write_spec

from idiff.launch.commands import main as submit_main
from idiff.launch.commands import resume_main


@pytest.fixture
def no_slurm(monkeypatch):
    """A PATH without Slurm's commands, as on a laptop or a login node without the Slurm module."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))


@pytest.fixture
def spec_path(tmp_path, shapes_dir):
    spec = tiny_spec(shapes_dir, tmp_path / "run", max_steps=2)
    spec["resources"] = {"nodes": 2, "partition": "gpu", "account": "proj", "timeout_min": 5}
    return write_spec(tmp_path / "job.yaml", spec)


def test_without_slurm_a_submission_is_refused_and_names_the_way_to_run_here(no_slurm, spec_path, tmp_path, capsys):
    assert submit_main([spec_path]) == 2
    err = capsys.readouterr().err
    assert "no Slurm reachable from this machine (sbatch and srun not found on PATH)" in err, err
    assert "--local" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_without_slurm_a_resume_is_refused_too(no_slurm, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert resume_main([str(tmp_path / "run")]) == 2  # not a run dir: refused before Slurm is looked for
    assert resume_main([str(tmp_path / "nowhere")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_dry_run_without_slurm_says_where_the_job_would_go(no_slurm, spec_path, tmp_path, capsys):
    assert submit_main([spec_path, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would submit tiny: Slurm, partition gpu, account proj, 2 nodes x 1 rank, 0 GPU(s) per node" in out
    assert "resources.gpus_per_node is 0: every rank runs on CPUs" in out
    assert "slurm_partition: gpu" in out and "slurm_account: proj" in out
    assert "a submission from here is refused" in out
    assert not (tmp_path / "run").exists()


def test_a_local_submission_says_it_runs_here(spec_path, tmp_path, capsys):
    assert submit_main([spec_path, "--local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would submit tiny: here, on this machine (submitit's local executor), 2 rank(s)" in out
    assert "every rank runs on CPUs" not in out  # a local run is not sent to GPU nodes


def test_a_dry_run_checks_the_paths_a_run_reads(no_slurm, tmp_path, capsys):
    spec = tiny_spec(tmp_path / "no-such-data", tmp_path / "run")
    assert submit_main([write_spec(tmp_path / "job.yaml", spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"train.data_dir: {tmp_path / 'no-such-data'} does not exist" in err, err
    assert not (tmp_path / "run").exists()


def test_a_dry_run_checks_the_checkpoint_a_sample_job_loads(no_slurm, trained, tmp_path, capsys):
    spec = {"kind": "sample", "name": "s", "run_dir": str(tmp_path / "s"),
            "sample": {"from_run": str(trained["run"]), "checkpoint": 500, "num_samples": 4}}
    assert submit_main([write_spec(tmp_path / "s.yaml", spec), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "step 500" in err and "does not exist; its complete checkpoints are at steps 2, 4" in err, err
    spec["sample"]["checkpoint"] = 4
    assert submit_main([write_spec(tmp_path / "s.yaml", spec), "--dry-run"]) == 0
    assert not os.path.exists(tmp_path / "s")
