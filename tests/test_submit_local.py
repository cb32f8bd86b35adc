"""idiff-submit --local: the same submitted callable through submitit's local executor, no Slurm needed."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEST_ENV, assert_same_tensors, final_files, idiff, tiny_spec, write_spec

# Real training runs in processes: `make test-all` (and CI) runs them.
pytestmark = pytest.mark.slow


def test_local_executor_runs_two_ranks_like_nproc_2(shapes_dir, tmp_path):
    spec = tiny_spec(shapes_dir, tmp_path / "submitted", max_steps=6, save_interval=6)
    spec["resources"] = {"tasks_per_node": 2, "cpus_per_task": 1, "timeout_min": 10}
    path = write_spec(tmp_path / "submitted.yaml", spec)
    out = subprocess.run([str(Path(sys.executable).parent / "idiff-submit"), path, "--local"], capture_output=True,
                         text=True, timeout=120, env=TEST_ENV)
    assert out.returncode == 0, out.stderr
    assert "(local)" in out.stdout and f"run dir: {tmp_path / 'submitted'}" in out.stdout
    history = tmp_path / "submitted" / "jobs.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        events = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
        if any(e["event"] == "end" for e in events):
            break
        time.sleep(0.5)
    ends = [e for e in events if e["event"] == "end"]
    assert ends and ends[0]["status"] == "completed", events
    assert [e["world_size"] for e in events if e["event"] == "start"] == [2]
    spec["run_dir"] = str(tmp_path / "local")
    idiff("train", write_spec(tmp_path / "local.yaml", spec), "--nproc", 2)
    assert_same_tensors(final_files(tmp_path / "submitted", 6), final_files(tmp_path / "local", 6))
