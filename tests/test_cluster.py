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
        capture_output=True, text=True, check=True,
        env={**TEST_ENV, "IDIFF": str(Path(sys.executable).parent / "idiff")})
    job = out.stdout.strip().split(";")[0]
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    log = (reference["root"] / f"sbatch-{job}.out").read_text()
    assert "rank 0/2 (local 0, slurm, cpu)" in log
    assert_same_tensors(final_files(run_dir, STEPS), reference["final"])


# ----------------------------------------------------------------- chains and evaluations during training
def tiny_chain(root, shapes_dir, name, train_data=None):
    """Spec files of a chain: tiny train (4 steps) -> 4 DDIM samples -> NLL of 2 images, one CPU rank each."""
    resources = {"nodes": 1, "cpus_per_task": 1, "timeout_min": 10}
    train = tiny_spec(train_data or shapes_dir, root / f"{name}_train", max_steps=4, save_interval=2, num_workers=0)
    train.update(name=f"{name}_train", resources=resources)
    sample = {"kind": "sample", "name": f"{name}_sample", "run_dir": str(root / f"{name}_sample"),
              "resources": resources, "sample": {"from_run": train["run_dir"], "num_samples": 4, "batch_size": 2,
                                                 "use_ddim": True, "timestep_respacing": "ddim5"}}
    evaluate = {"kind": "evaluate", "name": f"{name}_nll", "run_dir": str(root / f"{name}_nll"), "resources": resources,
                "evaluate": {"metrics": ["nll"], "from_run": train["run_dir"], "data_dir": shapes_dir,
                             "num_samples": 2, "batch_size": 2}}
    return [write_spec(root / f"{name}_{spec['kind']}.yaml", spec) for spec in (train, sample, evaluate)], \
        [Path(spec["run_dir"]) for spec in (train, sample, evaluate)]


def sacct_times(job_id: str) -> tuple[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "Start,End", "-j", job_id], capture_output=True, text=True)
    return tuple(out.stdout.strip().splitlines()[-1].split("|"))


def job_log(run_dir, job_id) -> str:
    return (Path(run_dir) / "slurm" / job_id / f"{job_id}_0_log.err").read_text()


def test_chain_runs_its_stages_in_order_and_status_follows_it(tmp_path, shapes_dir):
    specs, run_dirs = tiny_chain(tmp_path, shapes_dir, "chain")
    out = console("idiff-submit", *specs).stdout
    jobs = re.findall(r"submitted job (\d+)", out)
    assert len(jobs) == 3 and f"chain of 3 jobs: {' -> '.join(jobs)}" in out
    wait_for_step(run_dirs[0], 1)
    status = idiff("status", run_dirs[1]).stdout  # any stage's run dir shows the whole chain
    print(status)  # pytest -s shows what a running chain looks like
    # Only what holds whatever the timing: on a busy machine stage 1's 4 steps may be over by now.
    assert re.match(r"chain of 3 jobs: (running stage [123] of 3 \(|waiting in the queue|finished)", status), status
    if f"slurm job {jobs[0]}: RUNNING" in status:
        assert status.startswith("chain of 3 jobs: running stage 1 of 3 (train chain_train)"), status
        assert f"slurm job {jobs[1]}: PENDING (Dependency)" in status
    assert wait_state(jobs[2], {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", job_log(run_dirs[2], jobs[2])
    assert [state(job) for job in jobs] == ["COMPLETED"] * 3
    times = [sacct_times(job) for job in jobs]
    assert times[0][1] <= times[1][0] and times[1][1] <= times[2][0]  # ISO times: each starts after the last ended
    assert json.loads((run_dirs[2] / "metrics.json").read_text())["nll"]["num_images"] == 2
    # Progress lines in the Slurm output files, where no terminal shows a bar
    assert re.search(r"^train chain_train: step 4/4 \(100\.0%\) \| loss ", job_log(run_dirs[0], jobs[0]), re.M)
    assert re.search(r"^sample chain_sample: img 2/4 \(50\.0%\) \| .* img/s \| elapsed ", job_log(run_dirs[1], jobs[1]),
                     re.M)
    assert re.search(r"^nll: step (\d+)/\1 \(100\.0%\) \| bpd .* \| images 2 ", job_log(run_dirs[2], jobs[2]), re.M)
    assert idiff("status", run_dirs[0]).stdout.startswith("chain of 3 jobs: finished")


def test_chain_whose_first_stage_fails_leaves_no_job_pending(tmp_path, shapes_dir):
    empty = tmp_path / "no-images"
    empty.mkdir()  # exists, so the chain validates; training finds no image in it and fails
    specs, run_dirs = tiny_chain(tmp_path, shapes_dir, "failing", train_data=empty)
    jobs = re.findall(r"submitted job (\d+)", console("idiff-submit", *specs).stdout)
    assert wait_state(jobs[0], {"COMPLETED", "FAILED", "CANCELLED"}) == "FAILED"
    for job in jobs[1:]:
        assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60) == "CANCELLED"
    queued = subprocess.run(["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True).stdout
    assert queued.strip() == ""
    assert idiff("status", run_dirs[0]).stdout.startswith("chain of 3 jobs: stopped: stage 1 (failing_train) is FAILED")


def test_evaluations_during_training_are_jobs_of_their_own(tmp_path, shapes_dir):
    spec = tiny_spec(shapes_dir, tmp_path / "evaluated", max_steps=4, save_interval=2, num_workers=0)
    spec["train"]["evaluate"] = {"every": 2, "metrics": ["nll"], "data_dir": shapes_dir, "num_samples": 2,
                                 "batch_size": 2}
    spec["resources"] = {"nodes": 1, "cpus_per_task": 1, "timeout_min": 10}
    run_dir = tmp_path / "evaluated"
    job = submitted_job_id(console("idiff-submit", write_spec(tmp_path / "evaluated.yaml", spec)).stdout)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", job_log(run_dir, job)
    submitted = {step: json.loads((run_dir / "evals" / f"{step:06d}" / "submitted.json").read_text())["job_ids"]
                 for step in (2, 4)}
    for ids in submitted.values():
        assert wait_state(ids[-1], {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    rows = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()]
    assert sorted((r["step"], r["job_id"]) for r in rows) == [(2, submitted[2][-1]), (4, submitted[4][-1])]
    assert all("nll_bpd" in r["metrics"] for r in rows)
    assert (run_dir / "metrics.png").stat().st_size > 0
    status = idiff("status", run_dir).stdout
    assert f"evaluation of step 4: slurm job(s) {submitted[4][-1]}: COMPLETED" in status
    assert "evaluations: 2 (last: step 4: nll_bpd " in status


def test_chain_whose_training_is_preempted_resumes_and_finishes_in_order(tmp_path, shapes_dir):
    specs, run_dirs = tiny_chain(tmp_path, shapes_dir, "preempted_chain")
    jobs = re.findall(r"submitted job (\d+)", console("idiff-submit", *specs).stdout)
    wait_for_step(run_dirs[0], 1)
    subprocess.run(["scancel", "--signal=USR2", jobs[0]], check=True)
    assert wait_state(jobs[2], {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", job_log(run_dirs[2], jobs[2])
    history = [json.loads(line) for line in (run_dirs[0] / "jobs.jsonl").read_text().splitlines()]
    assert [e["status"] for e in history if e["event"] == "end"] == ["preempted", "completed"]
    assert {e["slurm_job_id"] for e in history if e["event"] == "start"} == {jobs[0]}  # requeued: the same job
    times = [sacct_times(job) for job in jobs]
    assert times[0][1] <= times[1][0] and times[1][1] <= times[2][0]
    assert (run_dirs[2] / "metrics.json").exists()


def test_a_run_dir_written_by_a_slurm_job_is_refused_to_a_second_writer_and_to_idiff_resume(tmp_path, shapes_dir):
    """One writer per run dir across the cluster's nodes: the lease (a file, no flock) names the Slurm job."""
    path, run_dir = spec_file(tmp_path, shapes_dir, "leased")
    job = submitted_job_id(console("idiff-submit", path).stdout)
    try:
        wait_for_step(run_dir, 2)
        second = idiff("train", path, check=False)  # here, on the login node
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"Slurm job {job}" in second.stderr and "is being written by process" in second.stderr
        resumed = console("idiff-resume", run_dir, check=False)
        assert resumed.returncode == 2 and job in resumed.stderr, resumed.stderr[-2000:]
        assert "submitted job" not in resumed.stdout
    finally:
        subprocess.run(["scancel", job], check=False)
    wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"})
