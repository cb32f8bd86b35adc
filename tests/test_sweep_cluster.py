"""Sweeps on the real 2-node cluster (slurm/start-cluster.sh): one job array per stage, points independent of one
another (a failed point, a preempted task), each point equal to the same run alone, and what each cost."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import (
    assert_same_tensors,
    final_files,
    idiff,
    idiff_in_process,
    require_service,
    slurm_cluster_problem,
    tiny_spec,
    wait_for_step,
    write_spec,
)
from test_cluster import console, state, wait_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
STEPS = 60
RESOURCES = {"nodes": 1, "cpus_per_task": 1, "timeout_min": 10}
DONE = {"COMPLETED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="module", autouse=True)
def slurm():
    require_service(slurm_cluster_problem())


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "jobs.jsonl").read_text().splitlines()]


def array_tasks(output: str) -> tuple[str, list[str]]:
    array = re.search(r"submitted job array (\d+) \((\d+) tasks", output)
    return array.group(1), [f"{array.group(1)}_{i}" for i in range(int(array.group(2)))]


def sacct_array_ids(array: str) -> set[str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID", "-j", array], capture_output=True, text=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


def test_a_2x2_sweep_is_one_array_a_preempted_task_requeues_alone_and_every_point_equals_its_run_alone(
        tmp_path, shapes_dir):
    spec = tiny_spec(shapes_dir, tmp_path / "grid", max_steps=STEPS, save_interval=10, num_workers=0)
    spec["resources"] = RESOURCES
    path = write_spec(tmp_path / "grid.yaml", spec)
    out = console("idiff-submit", path, "--sweep", "train.lr=1e-4,2e-4", "--sweep", "model.dropout=0.0,0.1").stdout
    array, tasks = array_tasks(out)
    assert len(tasks) == 4 and out.count("submitted job array") == 1
    points = ["lr=1e-4,dropout=0.0", "lr=1e-4,dropout=0.1", "lr=2e-4,dropout=0.0", "lr=2e-4,dropout=0.1"]
    preempted = tmp_path / "grid" / points[1]
    wait_for_step(preempted, 5)
    status = idiff("status", tmp_path / "grid").stdout
    assert all(re.search(rf"^{re.escape(p)}\s+(PENDING|RUNNING|COMPLETED)", status, re.M) for p in points), status
    subprocess.run(["scancel", "--signal=USR2", tasks[1]], check=True)
    for task in tasks:
        assert wait_state(task, DONE, timeout=300) == "COMPLETED"
    assert sacct_array_ids(array) == set(tasks)  # one sbatch: the tasks of one array
    for point, task in zip(points, tasks):
        events = history(tmp_path / "grid" / point)
        ends = [e["status"] for e in events if e["event"] == "end"]
        assert ends == (["preempted", "completed"] if point == points[1] else ["completed"]), (point, events)
        assert {e["slurm_job_id"] for e in events if e["event"] == "start"} == {task}  # requeued: the same task
        lr, dropout = (part.split("=")[1] for part in point.split(","))
        alone = tmp_path / f"alone-{point}"
        # With the task's one thread (cpus_per_task): another thread count sums in another order.
        idiff_in_process("train", path, "--set", f"train.lr={lr}", "--set", f"model.dropout={dropout}",
                         "--set", f"run_dir={alone}", env={"OMP_NUM_THREADS": "1"})
        assert_same_tensors(final_files(tmp_path / "grid" / point, STEPS), final_files(alone, STEPS))

    # Cost: the preempted point's second job resumed where the first one's checkpoint was: nothing redone
    events = history(preempted)
    first, second = [e["cost"] for e in events if e["event"] == "end"]
    log = (tmp_path / "grid" / "slurm" / tasks[1] / f"{tasks[1]}_0_log.err").read_text()
    resumed_at = int(re.findall(r"start at step (\d+)", log)[-1])
    assert first["images"] == resumed_at * 8 and second["images"] == (STEPS - resumed_at) * 8
    assert second["lost_steps"] == 0 and second["restart_count"] == 1
    assert second["queued_s"] is not None and second["queued_s"] >= 0  # from sacct: slurmdbd runs here
    status = idiff("status", tmp_path / "grid", "--sort", "loss").stdout
    print(status)  # pytest -s shows a finished sweep's table
    rows = {line.split()[0]: line.split() for line in status.splitlines() if line.startswith("lr=")}
    assert set(rows) == set(points) and all(row[1] == "COMPLETED" for row in rows.values())
    header = status.splitlines()[1].split()
    for point, row in rows.items():
        cells = dict(zip(header, row))
        assert float(cells["node-h"]) > 0 and float(cells["GPU-h"]) == 0
        assert cells["restarts"] == ("1" if point == points[1] else "0") and cells["lost"] == "0"
    assert re.search(r"sweep cost: 5 job\(s\), .* 0 GPU-h, .* 1 restart\(s\), 0 step\(s\) lost", status)


def test_a_failed_training_point_cancels_its_own_sample_task_only(tmp_path, shapes_dir):
    empty = tmp_path / "no-images"
    empty.mkdir()  # exists, so the sweep validates; training finds no image in it and fails
    train = tiny_spec(shapes_dir, tmp_path / "train", max_steps=2, save_interval=2, num_workers=0)
    train["resources"] = RESOURCES
    sample = {"kind": "sample", "name": "samples", "run_dir": str(tmp_path / "samples"), "resources": RESOURCES,
              "sample": {"from_run": train["run_dir"], "num_samples": 2, "batch_size": 2, "use_ddim": True,
                         "timestep_respacing": "ddim5"}}
    specs = [write_spec(tmp_path / "train.yaml", train), write_spec(tmp_path / "sample.yaml", sample)]
    out = console("idiff-submit", *specs, "--sweep", f"train.data_dir={shapes_dir},{empty}").stdout
    trains, samples = [[f"{array}_{i}" for i in range(int(n))]
                       for array, n in re.findall(r"submitted job array (\d+) \((\d+) tasks", out)]
    assert wait_state(trains[1], DONE) == "FAILED" and wait_state(trains[0], DONE) == "COMPLETED"
    assert wait_state(samples[1], DONE, timeout=60) == "CANCELLED"
    assert wait_state(samples[0], DONE) == "COMPLETED"
    assert [state(task) for task in trains + samples] == ["COMPLETED", "FAILED", "COMPLETED", "CANCELLED"]
