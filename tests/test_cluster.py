"""idiff-submit / idiff-resume against the real local Slurm cluster (slurm/start-cluster.sh; CI starts it)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    TEST_ENV,
    assert_same_function,
    assert_same_tensors,
    final_files,
    idiff,
    require_service,
    slurm_cluster_problem,
    tiny_spec,
    wait_for_step,
    write_spec,
)

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
STEPS = 150


@pytest.fixture(scope="module", autouse=True)
def slurm():
    require_service(slurm_cluster_problem())


def console(script, *args, check=True):
    result = subprocess.run([str(Path(sys.executable).parent / script), *map(str, args)], capture_output=True,
                            text=True, timeout=120, env=TEST_ENV)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {args} exited {result.returncode}: {result.stderr[-3000:]}")
    return result


def spec_file(root, shapes_dir, name, **resources):
    spec = tiny_spec(shapes_dir, root / name, max_steps=STEPS, save_interval=10, log_interval=1)
    spec["resources"] = {"nodes": 2, "cpus_per_task": 1, "timeout_min": 10, "signal_delay_s": 60, **resources}
    return write_spec(root / f"{name}.yaml", spec), root / name


def submitted_job_id(output: str) -> str:
    return re.search(r"submitted job (\d+)", output).group(1)


def state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return lines[-1].split()[0] if lines else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED


def wait_state(job_id, states, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = state(job_id)
        if current in states:
            return current
        time.sleep(1)
    raise AssertionError(f"job {job_id} is {state(job_id)} after {timeout}s, expected one of {states}")


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
    """The same spec on 2 local ranks, uninterrupted."""
    root = tmp_path_factory.mktemp("cluster")
    path, run_dir = spec_file(root, shapes_dir, "local")
    idiff("train", path, "--nproc", 2)
    return {"root": root, "final": final_files(run_dir, STEPS)}


def test_submit_on_two_nodes_equals_two_local_ranks(reference, shapes_dir):
    path, run_dir = spec_file(reference["root"], shapes_dir, "two_nodes")
    out = console("idiff-submit", path, "--nodes", 2).stdout
    job = submitted_job_id(out)
    assert f"run dir: {run_dir}" in out and f"{job}_0_log.out" in out
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    assert_same_tensors(final_files(run_dir, STEPS), reference["final"])
    history = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    assert {e["launcher"] for e in history if e["event"] == "start"} == {"submitit"}


def test_usr2_preemption_checkpoints_requeues_and_finishes_exactly(reference, shapes_dir):
    path, run_dir = spec_file(reference["root"], shapes_dir, "preempted")
    job = submitted_job_id(console("idiff-submit", path).stdout)
    wait_for_step(run_dir, 10)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    history = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    ends = [e for e in history if e["event"] == "end"]
    assert [e["status"] for e in ends] == ["preempted", "completed"] and ends[0]["signal"] == "SIGUSR2"
    assert [e["restart_count"] for e in history if e["event"] == "start"] == [0, 1]
    assert_same_tensors(final_files(run_dir, STEPS), reference["final"])
    status = idiff("status", run_dir).stdout
    assert f"slurm job {job}: REQUEUED, COMPLETED (1 requeue(s))" in status


def cancel_midway(root, shapes_dir, name):
    path, run_dir = spec_file(root, shapes_dir, name)
    job = submitted_job_id(console("idiff-submit", path).stdout)
    wait_for_step(run_dir, 25)
    subprocess.run(["scancel", job], check=True)
    assert wait_state(job, {"CANCELLED", "FAILED", "COMPLETED"}) == "CANCELLED"
    # The job is CANCELLED at once, but its ranks may still be writing the checkpoint that SIGTERM asked
    # for (Slurm's KillWait): only once the job has left the queue are its files final.
    deadline = time.monotonic() + 60
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} never left the queue"
        time.sleep(0.5)
    steps = sorted(int(p.stem[-6:]) for p in (run_dir / "checkpoints").glob("checkpoint*.json"))
    assert steps and steps[-1] < STEPS
    return run_dir, steps[-1]


def test_hard_cancel_then_idiff_resume_loses_nothing_beyond_the_checkpoint(reference, shapes_dir):
    run_dir, last = cancel_midway(reference["root"], shapes_dir, "cancelled")
    job = submitted_job_id(console("idiff-resume", run_dir).stdout)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    log = (run_dir / "slurm" / job / f"{job}_0_log.err").read_text()
    assert f"start at step {last}" in log
    assert_same_tensors(final_files(run_dir, STEPS), reference["final"])


def test_resume_on_fewer_nodes_matches_to_float_rounding(reference, shapes_dir):
    run_dir, last = cancel_midway(reference["root"], shapes_dir, "shrunk")
    job = submitted_job_id(console("idiff-resume", run_dir, "--nodes", 1).stdout)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    log = (run_dir / "slurm" / job / f"{job}_0_log.err").read_text()
    assert "global batch 8 = 1 ranks x 8" in log and f"start at step {last}" in log
    assert_same_function(final_files(run_dir, STEPS), reference["final"])


def test_more_nodes_than_the_partition_has_fails_at_submit_with_slurms_reason(reference, shapes_dir):
    path, run_dir = spec_file(reference["root"], shapes_dir, "too_big")
    result = console("idiff-submit", path, "--nodes", 3, check=False)
    assert result.returncode == 2
    assert "the scheduler refused the job" in result.stderr
    assert "node configuration is not available" in result.stderr or "Node count specification" in result.stderr


def test_dry_run_shows_the_sbatch_parameters(reference, shapes_dir):
    path, _ = spec_file(reference["root"], shapes_dir, "dry", gpus_per_node=4, partition="gpu", qos="high",
                        container_image="nvcr.io#nvidia/pytorch:24.01-py3")
    out = console("idiff-submit", path, "--dry-run", "--nodes", 8).stdout
    for expected in ("nodes: 8", "ntasks_per_node: 4", "gpus_per_node: 4", "partition: gpu", "qos: high",
                     "signal_delay_s: 60", "--container-image=nvcr.io#nvidia/pytorch:24.01-py3"):
        assert expected in out
    assert not (reference["root"] / "dry").exists()


def test_max_requeues_bounds_the_requeues(reference, shapes_dir):
    path, run_dir = spec_file(reference["root"], shapes_dir, "no_requeue", max_requeues=0)
    job = submitted_job_id(console("idiff-submit", path).stdout)
    wait_for_step(run_dir, 10)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "FAILED"  # exit 75: checkpointed, not requeued
    log = (run_dir / "slurm" / job / f"{job}_0_log.err").read_text()
    assert "not requeued: 0 requeues reached resources.max_requeues=0" in log and f"idiff-resume {run_dir}" in log
    history = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    assert [e["status"] for e in history if e["event"] == "end"] == ["preempted"]


def test_plain_sbatch_script_runs_idiff_on_two_nodes(reference, shapes_dir):
    """slurm/train.sbatch -> srun idiff train: the rank environment comes from srun's variables."""
    path, run_dir = spec_file(reference["root"], shapes_dir, "sbatch")
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=10", f"--output={reference['root']}/sbatch-%j.out", str(REPO / "slurm" / "train.sbatch"), path],
        capture_output=True, text=True, check=True, env={**TEST_ENV, "IDIFF": str(Path(sys.executable).parent / "idiff")})
    job = out.stdout.strip().split(";")[0]
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    log = (reference["root"] / f"sbatch-{job}.out").read_text()
    assert "rank 0/2 (local 0, slurm, cpu)" in log
    assert_same_tensors(final_files(run_dir, STEPS), reference["final"])
