"""Training longer: raising train.max_steps of a finished run continues it from its newest checkpoint, recorded
in its history, and ends bit for bit where a run asked for the longer length from the start ends."""

import json

import pytest
from conftest import assert_same_tensors, final_files, idiff_in_process, tiny_spec, write_spec

# Real training runs in processes: `make test-all` (and CI) runs them.
pytestmark = pytest.mark.slow


def test_a_run_extended_from_4_to_6_steps_equals_a_run_of_6(tmp_path, shapes_dir):
    straight = tiny_spec(shapes_dir, tmp_path / "straight", max_steps=6, save_interval=2, num_workers=0)
    idiff_in_process("train", write_spec(tmp_path / "straight.yaml", straight))
    short = tiny_spec(shapes_dir, tmp_path / "extended", max_steps=4, save_interval=2, num_workers=0)
    path = write_spec(tmp_path / "extended.yaml", short)
    idiff_in_process("train", path)
    result = idiff_in_process("train", path, "--set", "train.max_steps=6")
    assert "the run now ends at train.max_steps=6 (was 4)" in result.stderr
    assert_same_tensors(final_files(tmp_path / "extended", 6), final_files(tmp_path / "straight", 6))
    events = [json.loads(line) for line in (tmp_path / "extended" / "jobs.jsonl").read_text().splitlines()]
    assert [e["changed"] for e in events if e["event"] == "extend"] == [{"train.max_steps": [4, 6]}]
    assert "max_steps: 6" in (tmp_path / "extended" / "spec.yaml").read_text()


def test_a_run_whose_learning_rate_anneals_cannot_outlast_the_anneal(tmp_path, shapes_dir):
    spec = tiny_spec(shapes_dir, tmp_path / "run", max_steps=2, save_interval=2, num_workers=0, lr_anneal_steps=2)
    path = write_spec(tmp_path / "run.yaml", spec)
    idiff_in_process("train", path)
    result = idiff_in_process("train", path, "--set", "train.max_steps=4", check=False)
    assert result.returncode == 2
    assert "the learning rate would reach 0 at step 2" in result.stderr
    changed = idiff_in_process("train", path, "--set", "train.max_steps=4", "--set", "train.lr_anneal_steps=4",
                               check=False)
    assert changed.returncode == 2 and "changed: train.lr_anneal_steps" in changed.stderr  # another schedule
