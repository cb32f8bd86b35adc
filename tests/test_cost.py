"""The cost of a job in its end record (idiff.launch.cost): work lost to a crash, images, allocation."""

import json
from pathlib import Path

import pytest
from conftest import idiff_in_process, tiny_spec, write_spec


def ends(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "jobs.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "end"]


def test_steps_logged_past_the_last_checkpoint_count_as_lost_when_the_run_resumes(tmp_path, shapes_dir):
    spec = tiny_spec(shapes_dir, tmp_path / "run", max_steps=6, save_interval=2, num_workers=0)
    path = write_spec(tmp_path / "run.yaml", spec)
    idiff_in_process("train", path)
    # A crash before checkpoint 6 was complete: steps 5 and 6 are logged, the newest checkpoint is step 4.
    (tmp_path / "run" / "checkpoints" / "checkpoint000006.json").unlink()
    idiff_in_process("train", path)
    first, second = (e["cost"] for e in ends(tmp_path / "run"))
    assert first["lost_steps"] == 0 and first["images"] == 6 * 8
    assert second["lost_steps"] == 2 and second["images"] == 2 * 8  # steps 5 and 6, trained again
    for cost in (first, second):
        assert cost["nodes"] == 1 and cost["gpus"] == 0 and cost["gpu_hours"] == 0
        assert cost["node_hours"] * 3600 == pytest.approx(cost["wall_s"]) and cost["wall_s"] > 0
        assert cost["s_per_kimg"] > 0 and len(cost["peak_memory_mb"]) == 1
        # each job saved at least its final checkpoint and waited for it
        assert 0 < cost["checkpoint_s"] < cost["wall_s"]
    status = idiff_in_process("status", tmp_path / "run").stdout
    assert "cost: 2 job(s)" in status and "1 restart(s), 2 step(s) lost" in status
