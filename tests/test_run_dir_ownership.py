"""idiff writes only into an empty (or absent) folder or a run dir it marked as its own; users' files are never
overwritten, appended to or moved, by jobs, idiff-submit or idiff-collect."""

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_MODEL, tiny_spec, write_spec

from idiff.cli import main
from idiff.collect import main as collect_main
from idiff.launch.commands import main as submit_main
from idiff.run_dir import OWNER_MARK
from idiff.shards import shard_name, write_shard

USERS_FILES = {"classes.json": b'["mine"]', "samples_000004.png": b"\x89PNG my picture", "results.npz": b"my data",
               "log.jsonl": b'{"my": "log"}\n', "notes.txt": b"do not touch"}


@pytest.fixture
def users_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, data in USERS_FILES.items():
        (folder / name).write_bytes(data)
    return folder


def assert_untouched(folder: Path, files=USERS_FILES):
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


def specs(tmp_path, run_dir) -> dict[str, dict]:
    weights = str(tmp_path / "weights.pt")  # never loaded: the run dir is refused first
    model = {"model": dict(TINY_MODEL), "diffusion": {"diffusion_steps": 50}}
    return {
        "train": tiny_spec(tmp_path / "data", run_dir),
        "sample": {"kind": "sample", "name": "s", "run_dir": str(run_dir), **model,
                   "sample": {"model_path": weights, "num_samples": 4}},
        "evaluate": {"kind": "evaluate", "name": "e", "run_dir": str(run_dir), **model,
                     "evaluate": {"metrics": ["nll"], "model_path": weights, "data_dir": str(tmp_path / "data")}},
    }


def refused(capsys, argv, *messages):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["train", "sample", "evaluate"])
def test_a_folder_of_the_users_files_is_refused_before_anything_is_written(tmp_path, users_folder, capsys, kind):
    spec = write_spec(tmp_path / "job.yaml", specs(tmp_path, users_folder)[kind])
    refused(capsys, [kind, spec], f"run_dir {users_folder} is not empty and not an idiff run dir", "classes.json")
    refused(capsys, [kind, spec, "--force-new"], f"run_dir {users_folder} is not empty and not an idiff run dir")
    assert_untouched(users_folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "mine"]  # nothing moved aside either


def test_a_spec_yaml_that_idiff_did_not_write_does_not_make_a_run_dir(tmp_path, users_folder, capsys):
    spec = specs(tmp_path, users_folder)["train"]
    path = write_spec(tmp_path / "job.yaml", spec)
    (users_folder / "spec.yaml").write_bytes(Path(path).read_bytes())  # the user's copy of the job, same spec
    refused(capsys, ["train", path], "it holds a spec.yaml that idiff did not write")
    assert_untouched(users_folder, {**USERS_FILES, "spec.yaml": Path(path).read_bytes()})


def submitted(tmp_path, run_dir) -> str:
    spec = tiny_spec(tmp_path / "data", run_dir)
    spec["resources"] = {"timeout_min": 5}
    return write_spec(tmp_path / "job.yaml", spec)


def test_idiff_submit_refuses_a_run_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_bytes(b"a file")
    assert submit_main([submitted(tmp_path, tmp_path / "run"), "--local"]) == 2
    assert f"run_dir {tmp_path / 'run'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "run").read_bytes() == b"a file"


def test_an_empty_folder_is_taken_and_marked(tmp_path, shapes_dir):
    (tmp_path / "run").mkdir()
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(shapes_dir, tmp_path / "run", max_steps=1, save_interval=1,
                                                       num_workers=0))
    assert main(["train", spec]) == 0
    assert (tmp_path / "run" / "spec.yaml").read_text().startswith(OWNER_MARK)
    assert main(["train", spec]) == 0  # its own run of the same spec: resumed (here: already complete)


def test_a_run_dir_from_before_the_mark_resumes_and_is_marked(tmp_path, shapes_dir):
    run = tmp_path / "run"
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(shapes_dir, run, max_steps=1, save_interval=1,
                                                       num_workers=0))
    assert main(["train", spec]) == 0
    saved = (run / "spec.yaml").read_text()
    (run / "spec.yaml").write_text(saved.removeprefix(OWNER_MARK))  # as idiff wrote it before the mark
    assert main(["train", spec]) == 0  # its own history beside the spec: idiff's run, resumed
    assert (run / "spec.yaml").read_text() == saved


def test_a_dry_run_leaves_no_folder_behind(tmp_path, capsys):
    (tmp_path / "data").mkdir()  # a dry run checks the paths a run reads
    assert submit_main([submitted(tmp_path, tmp_path / "run"), "--local", "--dry-run"]) == 0
    assert "# resolved spec" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_idiff_submit_refuses_the_users_folder_and_writes_nothing(tmp_path, users_folder, capsys):
    assert submit_main([submitted(tmp_path, users_folder), "--local"]) == 2
    assert f"run_dir {users_folder} is not empty and not an idiff run dir" in capsys.readouterr().err
    assert_untouched(users_folder)  # no slurm/ logs, no jobs.jsonl line


def three_shards(folder):
    for start, end in [(0, 2), (2, 3), (3, 5)]:
        write_shard(folder, start, end, {"arr_0": np.full((end - start, 8, 8, 3), start, np.uint8)})


def test_collect_to_a_named_output_leaves_a_grid_png_beside_it_alone(tmp_path):
    three_shards(tmp_path / "samples")
    (tmp_path / "grid.png").write_bytes(b"the user's grid")
    assert collect_main([str(tmp_path / "samples"), "-o", str(tmp_path / "x.npz")]) == 0
    assert (tmp_path / "grid.png").read_bytes() == b"the user's grid"
    assert (tmp_path / "x_grid.png").read_bytes()[:4] == b"\x89PNG"


def test_collect_refuses_to_replace_an_existing_grid_unless_forced(tmp_path, capsys):
    three_shards(tmp_path)
    (tmp_path / "grid.png").write_bytes(b"the user's grid")
    assert collect_main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'grid.png'} exists; pass --force" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["grid.png", *(shard_name(a, b) for a, b in [(0, 2), (2, 3), (3, 5)])]
    assert collect_main([str(tmp_path), "--force"]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
