"""Sweeps without a cluster: the grid, the points' names, bad input refused before anything is written, the dry
run of a chain of job arrays, and --local running the points one after another."""

import json
from pathlib import Path

import pytest
from conftest import assert_same_tensors, final_files, idiff_in_process, tiny_spec, write_spec

from idiff.errors import UserError
from idiff.launch.commands import main as submit_main
from idiff.launch.commands import resume_main
from idiff.launch.sweep import grid_points, point_names


@pytest.fixture
def specs(tmp_path, shapes_dir):
    """A tiny train spec and a sample spec reading it, as files; the sweep's run dirs are below ``runs``."""
    train = tiny_spec(shapes_dir, tmp_path / "runs" / "grid", max_steps=2, save_interval=2, num_workers=0)
    sample = {"kind": "sample", "name": "grid_samples", "run_dir": str(tmp_path / "runs" / "grid_samples"),
              "sample": {"from_run": train["run_dir"], "num_samples": 4, "batch_size": 4, "use_ddim": True,
                         "timestep_respacing": "ddim5"}}
    return {"train": write_spec(tmp_path / "train.yaml", train), "sample": write_spec(tmp_path / "sample.yaml", sample),
            "runs": tmp_path / "runs", "root": tmp_path}


def names(*sweeps, sweep_file=None):
    return [p.name for p in point_names(grid_points(list(sweeps), sweep_file))]


def test_the_grid_is_every_combination_named_by_short_keys():
    assert names("train.lr=1e-4,2e-4", "model.dropout=0.1,0.3") == [
        "lr=1e-4,dropout=0.1", "lr=1e-4,dropout=0.3", "lr=2e-4,dropout=0.1", "lr=2e-4,dropout=0.3"]


def test_keys_sharing_a_last_part_keep_their_sections_and_unsafe_characters_go():
    assert names("train.seed=1,2", "sample.seed=3") == ["train.seed=1,sample.seed=3", "train.seed=2,sample.seed=3"]
    assert names("train.data_dir=data/a b") == ["data_dir=data_a_b"]


def test_a_sweep_file_lists_points_and_a_grid(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("grid:\n  model.dropout: [0.0, 0.3]\npoints:\n  - {train.lr: 1.0e-4}\n  - {train.lr: 3.0e-4}\n")
    assert names("train.seed=7", sweep_file=str(path)) == [
        "lr=0.0001,seed=7,dropout=0.0", "lr=0.0001,seed=7,dropout=0.3",
        "lr=0.0003,seed=7,dropout=0.0", "lr=0.0003,seed=7,dropout=0.3"]


def refused(capsys, argv, runs, *messages):
    assert submit_main(argv) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err
    assert "Traceback" not in err
    assert not Path(runs).exists()  # nothing written
    return err


@pytest.mark.parametrize("sweeps, messages", [
    (["train.lrr=1e-4,2e-4"], ["--sweep train.lrr: no such key"]),
    (["train.lr=1e-4,-1"], ["sweep point lr=-1", "train.lr"]),  # the second point fails validation
    (["train.lr=1e-4,1e-4"], ["same run dir name lr=1e-4"]),
    (["train.lr="], ["--sweep train.lr: an empty value"]),
    (["train.lr=1e-4,2e-4", "model.dropout=0.1,0.2", "--max-points", "3"], ["4 points, more than --max-points 3",
                                                                           "split it into several sweeps"]),
    (["run_dir=a,b"], ["--sweep run_dir"]),
])
def test_bad_sweeps_exit_2_naming_the_key_before_anything_is_written(capsys, specs, sweeps, messages):
    argv = [specs["train"], "--dry-run"]
    for item in sweeps:
        argv += [item] if item.startswith("--") or item.isdigit() else ["--sweep", item]
    refused(capsys, argv, specs["runs"], *messages)


def test_a_resource_key_that_changes_the_allocation_is_refused(capsys, specs):
    refused(capsys, [specs["train"], "--dry-run", "--sweep", "resources.nodes=1,2"], specs["runs"],
            "its resources differ", "a job array has one allocation size")


def test_an_empty_sweep_file_is_refused(capsys, specs):
    path = specs["root"] / "empty.yaml"
    path.write_text("points: []\n")
    refused(capsys, [specs["train"], "--dry-run", "--sweep-file", str(path)], specs["runs"], "the list is empty")


def test_a_folder_holding_another_sweep_is_refused(capsys, specs):
    (specs["runs"] / "grid").mkdir(parents=True)
    (specs["runs"] / "grid" / "sweep.json").write_text(json.dumps({"points": [{"name": "lr=1"}], "arrays": []}))
    assert submit_main([specs["train"], "--dry-run", "--sweep", "train.lr=1e-4,2e-4"]) == 2
    assert "holds another sweep" in capsys.readouterr().err


def test_dry_run_of_a_chained_sweep_shows_arrays_chained_by_aftercorr(capsys, specs):
    assert submit_main([specs["train"], specs["sample"], "--dry-run", "--sweep", "train.lr=1e-4,2e-4",
                        "--max-parallel", "1"]) == 0
    out = capsys.readouterr().out
    train, sample = out.split("# stage 2 (")
    grid = specs["runs"] / "grid"
    assert f"point lr=2e-4: train.lr=2e-4 -> {grid / 'lr=2e-4'}, {specs['runs'] / 'grid_samples' / 'lr=2e-4'}" in out
    assert "array: 0-1%1" in train and "dependency" not in train
    assert "dependency: aftercorr:<the job array of stage 1>" in sample
    assert f"from_run: {grid / 'lr=1e-4'}" in sample  # each point samples its own training run
    assert not specs["runs"].exists()


@pytest.mark.slow
def test_local_sweep_runs_each_point_as_it_would_run_alone(capsys, specs, tmp_path):
    assert submit_main([specs["train"], "--local", "--sweep", "train.lr=1e-4,3e-4"]) == 0
    grid = specs["runs"] / "grid"
    for lr in ("1e-4", "3e-4"):
        alone = tmp_path / f"alone-{lr}"
        idiff_in_process("train", specs["train"], "--set", f"train.lr={lr}", "--set", f"run_dir={alone}")
        assert_same_tensors(final_files(grid / f"lr={lr}", 2), final_files(alone, 2))
    status = idiff_in_process("status", grid, "--sort", "loss").stdout
    rows = [line for line in status.splitlines() if line.startswith("lr=")]
    assert len(rows) == 2 and all(" completed " in row and " 2/2 " in row for row in rows), status
    assert "sweep cost: 2 job(s)" in status and "0 GPU-h" in status
    ends = [json.loads(line) for line in (grid / "lr=1e-4" / "jobs.jsonl").read_text().splitlines()
            if '"end"' in line]
    cost = ends[-1]["cost"]
    assert cost["gpus"] == 0 and cost["gpu_hours"] == 0 and cost["node_hours"] > 0 and cost["images"] == 16
    assert cost["lost_steps"] == 0 and cost["peak_memory_mb"][0] > 0
    capsys.readouterr()
    assert resume_main([str(grid), "--local"]) == 0  # every point is finished: nothing runs again
    assert "no point to resume" in capsys.readouterr().out


def test_sort_by_a_metric_no_point_has_is_refused(specs):
    (specs["runs"] / "grid").mkdir(parents=True)
    (specs["runs"] / "grid" / "sweep.json").write_text(json.dumps({"points": [{"name": "lr=1"}], "arrays": []}))
    result = idiff_in_process("status", specs["runs"] / "grid", "--sort", "fid", check=False)
    assert result.returncode == 2 and "--sort fid: no point has it" in result.stderr


def test_grid_points_refuses_a_key_given_twice():
    with pytest.raises(UserError, match="given twice"):
        grid_points(["train.lr=1", "train.lr=2"], None)
