"""Nothing idiff reads, writes, truncates, renames or deletes inside a run dir follows a link out of it.

A symbolic link anywhere below the run dir (a file, or a folder such as ``checkpoints/`` or ``samples/``) is
refused with exit 2 naming it, and the file or folder it points to is left as it was. A file that idiff
changes in place (a log it appends to or trims) and that has other hard links is first made a file of its
own, so the other names keep their content. docs/security.md states these rules.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import copy_run, idiff_in_process

from idiff import storage
from idiff.checkpoints import CheckpointStore
from idiff.errors import UserError
from idiff.run_dir import RunDir
from idiff.shards import scan_shards, write_shard

USERS = "the user's own file\n"


@pytest.fixture
def run(tmp_path) -> RunDir:
    (tmp_path / "run").mkdir()
    return RunDir(tmp_path / "run")


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file of the user's, outside the run dir, beside a folder of theirs."""
    (tmp_path / "theirs").mkdir()
    path = tmp_path / "theirs" / "file.txt"
    path.write_text(USERS)
    return path


def link_folder(run: RunDir, name: str, outside: Path) -> Path:
    os.symlink(outside.parent, Path(run.path) / name)
    return outside.parent


# What idiff does to the files of a run dir, each through the one module that opens them (storage).
FILE_ACTIONS = {
    "append to log.jsonl": ("log.jsonl", lambda run: storage.append_text(run.log_file, '{"step": 1}\n')),
    "trim log.jsonl on resume": ("log.jsonl", lambda run: storage.drop_trailing_lines(run.log_file, lambda _: False)),
    "record in jobs.jsonl": ("jobs.jsonl", lambda run: run.record("start")),
    "read jobs.jsonl": ("jobs.jsonl", lambda run: run.history()),
    "replace spec.yaml": ("spec.yaml", lambda run: run.write_spec("kind: train\n")),
    "read spec.yaml": ("spec.yaml", lambda run: run.is_owned()),
    "remove a checkpoint file": ("model000002.pt", lambda run: storage.remove(run / "model000002.pt")),
}


@pytest.mark.parametrize("action", FILE_ACTIONS)
def test_a_symlinked_file_in_a_run_dir_is_refused_naming_it(run, outside, action):
    name, act = FILE_ACTIONS[action]
    os.symlink(outside, Path(run.path) / name)
    with pytest.raises(UserError, match=f"{run / name} is a symbolic link inside {run.path}"):
        act(run)
    assert outside.read_text() == USERS and (Path(run.path) / name).is_symlink()


@pytest.mark.parametrize("action", ["append to log.jsonl", "trim log.jsonl on resume", "record in jobs.jsonl"])
def test_a_hard_linked_log_is_made_a_file_of_its_own_before_it_changes(run, outside, action, capsys):
    name, act = FILE_ACTIONS[action]
    os.link(outside, Path(run.path) / name)
    act(run)
    assert outside.read_text() == USERS  # neither appended to nor truncated through the other name
    assert os.stat(Path(run.path) / name).st_nlink == 1
    assert f"{run / name} had 1 other hard link(s)" in capsys.readouterr().err


def test_a_symlinked_checkpoints_folder_receives_nothing_and_loses_nothing(run, outside):
    theirs = link_folder(run, "checkpoints", outside)
    (theirs / "model000002.pt").write_text(USERS)  # a file of the user's with a checkpoint's name
    (theirs / "checkpoint000002.json").write_text("{}")
    store = CheckpointStore(run.checkpoints)
    with pytest.raises(UserError, match="checkpoints is a symbolic link"):
        store.write(4, {"model000004.pt": {"w": torch.zeros(2)}}, {})
    with pytest.raises(UserError, match="checkpoints is a symbolic link"):
        store.prune(keep_last=1, keep_every=None)
    with pytest.raises(UserError, match="checkpoints is a symbolic link"):
        store.latest_complete()
    assert sorted(os.listdir(theirs)) == ["checkpoint000002.json", "file.txt", "model000002.pt"]
    assert (theirs / "model000002.pt").read_text() == USERS


def test_a_symlinked_samples_folder_receives_no_shard_and_renames_nothing(run, outside):
    theirs = link_folder(run, "samples", outside)
    (theirs / "shard-00000000-00000002.npz").write_text(USERS)  # would be moved aside as .rejected
    with pytest.raises(UserError, match="samples is a symbolic link"):
        write_shard(run.samples, 2, 4, {"arr_0": np.zeros((2, 4, 4, 3), np.uint8)})
    with pytest.raises(UserError, match="samples is a symbolic link"):
        scan_shards(run.samples)
    assert sorted(os.listdir(theirs)) == ["file.txt", "shard-00000000-00000002.npz"]


@pytest.mark.parametrize("folder", ["eval", "faults", "evals"])
def test_no_folder_of_a_run_dir_is_written_through_a_link(run, outside, folder):
    theirs = link_folder(run, folder, outside)
    with pytest.raises(UserError, match=f"{folder} is a symbolic link"):
        storage.atomic_write_text(storage.join(run / folder, "x.json"), "{}")
    assert os.listdir(theirs) == ["file.txt"]


def test_the_run_dir_itself_may_be_a_link(tmp_path):
    """Its path is the user's choice (runs/ on a scratch disk): only what is inside it is checked."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "run")
    run = RunDir(tmp_path / "run")
    run.record("start")
    assert [e["event"] for e in run.history()] == ["start"]


def test_status_and_a_resume_refuse_a_log_that_links_out_of_the_run(trained, outside):
    run = copy_run(trained["run"], trained["root"] / "linked-log")
    Path(run / "log.jsonl").unlink()
    os.symlink(outside, run / "log.jsonl")
    spec = Path(trained["root"] / "linked.yaml")
    spec.write_text(Path(run / "spec.yaml").read_text().replace(str(trained["run"]), str(run)))
    for argv in (["status", run], ["train", spec]):
        result = idiff_in_process(*argv, check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"{run / 'log.jsonl'} is a symbolic link inside {run}" in result.stderr
        assert "Traceback" not in result.stderr
    assert outside.read_text() == USERS
