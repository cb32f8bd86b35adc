"""Preemption as it is delivered: to every process of the job, data-loader workers included.

Slurm signals every process of a job step; ``timeout`` and a terminal's Ctrl-C signal the whole
process group. Only the main process of each rank acts on it: the run checkpoints at a step boundary
and exits 75 (130 after Ctrl-C, saying the run can be resumed), no worker is left behind, and the
resumed run ends bit for bit where an uninterrupted one does.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TEST_ENV,
    assert_same_tensors,
    final_files,
    idiff,
    idiff_in_process,
    require_service,
    slurm_cluster_problem,
    start_idiff,
    tiny_spec,
    write_spec,
)
from test_train_resume import logged_step, wait_for

REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE, WORKERS = 40, 16, 2
EXIT_CODES = {signal.SIGTERM: 75, signal.SIGUSR2: 75, signal.SIGINT: 130}
# One thread per process: the jobs here run beside each other's data-loader workers (and other tests),
# where spinning OpenMP threads would make them many times slower.
ENV = {"OMP_NUM_THREADS": "1"}
# Each test starts jobs as processes and signals them: seconds each, even on an idle machine.
pytestmark = pytest.mark.slow


def group_members(pgid: int) -> list[int]:
    """The processes in process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def signal_group_midway(proc, ready, sig, what) -> str:
    """Once ``ready()``, send ``sig`` to the process group of ``proc`` (started in a session of its own);
    returns its stderr after checking that no process of the group, worker or rank, outlived it."""
    try:
        wait_for(ready, proc, what=what)
        members = group_members(proc.pid)
        os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_members(proc.pid), f"processes of {members} outlived the run"
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr


def assert_stopped_with_a_checkpoint(run_dir: Path, sig, stderr: str) -> int:
    stopped_at = logged_step(run_dir)
    assert 3 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / f"checkpoint{stopped_at:06d}.json").exists()
    ends = [e for e in map(json.loads, (run_dir / "jobs.jsonl").read_text().splitlines()) if e["event"] == "end"]
    assert ends[-1]["status"] == "preempted" and ends[-1]["signal"] == sig.name
    assert f"stopped on {sig.name}; the run can be resumed" in stderr
    return stopped_at


def resume_and_compare(capfd, spec_path, run_dir, stopped_at, reference, *nproc):
    """The same command again, in this process: ``--nproc`` ranks print on the descriptors they inherit, which
    capfd reads."""
    resumed = idiff_in_process("train", spec_path, *nproc, env=ENV)
    assert f"start at step {stopped_at}" in resumed.stderr + capfd.readouterr().err
    assert_same_tensors(final_files(run_dir, STEPS), reference)


def train_spec(root, shapes_dir, name):
    spec = tiny_spec(shapes_dir, root / name, max_steps=STEPS, save_interval=SAVE, num_workers=WORKERS)
    return write_spec(root / f"{name}.yaml", spec), root / name


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("group")


@pytest.fixture(scope="module")
def one_rank(root, shapes_dir):
    """The final weights of an uninterrupted run on one rank."""
    path, run_dir = train_spec(root, shapes_dir, "reference-1")
    idiff_in_process("train", path, env=ENV)
    return final_files(run_dir, STEPS)


@pytest.fixture(scope="module")
def two_ranks(root, shapes_dir):
    """The same on two ranks, which mpiexec and Slurm match bit for bit."""
    path, run_dir = train_spec(root, shapes_dir, "reference-2")
    idiff_in_process("train", path, "--nproc", 2, env=ENV)
    return final_files(run_dir, STEPS)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_local_run(root, shapes_dir, one_rank, sig, capfd):
    path, run_dir = train_spec(root, shapes_dir, f"local-{sig.name}")
    proc = start_idiff("train", path, env=ENV)
    ready = lambda: logged_step(run_dir) >= 3 and len(group_members(proc.pid)) > WORKERS  # noqa: E731
    stderr = signal_group_midway(proc, ready, sig, "step 3 with the workers started")
    assert proc.returncode == EXIT_CODES[sig], stderr[-3000:]
    resume_and_compare(capfd, path, run_dir, assert_stopped_with_a_checkpoint(run_dir, sig, stderr), one_rank)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_two_local_ranks_get_the_signal_twice(root, shapes_dir, two_ranks, sig, capfd):
    """The launcher forwards what the ranks also receive directly: a rank acts on the first."""
    path, run_dir = train_spec(root, shapes_dir, f"nproc-{sig.name}")
    proc = start_idiff("train", path, "--nproc", 2, env=ENV)
    ready = lambda: logged_step(run_dir) >= 3 and len(group_members(proc.pid)) > 2 * WORKERS + 2  # noqa: E731
    stderr = signal_group_midway(proc, ready, sig, "step 3 with every worker started")
    assert proc.returncode == EXIT_CODES[sig], stderr[-3000:]
    assert stderr.count(f"received {sig.name}") == 1  # rank 0 says so, both act on it
    stopped_at = assert_stopped_with_a_checkpoint(run_dir, sig, stderr)
    resume_and_compare(capfd, path, run_dir, stopped_at, two_ranks, "--nproc", 2)


@pytest.mark.mpi
def test_mpiexec(root, shapes_dir, two_ranks, capfd):
    """SIGUSR2, which Slurm sends before the time limit: mpiexec forwards it to the ranks. (SIGTERM it
    answers with SIGCONT, SIGTERM and SIGKILL a second apart each: see the README.)"""
    mpiexec = shutil.which("mpiexec")
    require_service(None if mpiexec else "mpiexec not found: install Open MPI (Debian: apt install openmpi-bin)")
    path, run_dir = train_spec(root, shapes_dir, "mpiexec")
    proc = subprocess.Popen([mpiexec, "-n", "2", "--oversubscribe", sys.executable, "-m", "idiff.cli", "train", path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**TEST_ENV, **ENV},
                            start_new_session=True)
    stderr = signal_group_midway(proc, lambda: logged_step(run_dir) >= 3, signal.SIGUSR2, "step 3")
    assert proc.returncode == 75, stderr[-3000:]
    stopped_at = assert_stopped_with_a_checkpoint(run_dir, signal.SIGUSR2, stderr)
    resume_and_compare(capfd, path, run_dir, stopped_at, two_ranks, "--nproc", 2)


# ---------------------------------------------------------------------------------------------- Slurm
def sbatch(root, path, name) -> str:
    """slurm/train.sbatch on both nodes with the real idiff; returns the job id."""
    out = subprocess.run(
        ["sbatch", "--parsable", "--job-name=idiff-group", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=10", f"--output={root}/{name}-%j.out", str(REPO / "slurm" / "train.sbatch"),
         path], capture_output=True, text=True, check=True, timeout=60,
        env={**TEST_ENV, **ENV, "IDIFF": str(Path(sys.executable).parent / "idiff")})
    return out.stdout.strip().split(";")[0]


def wait_until_gone(job: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still in the queue after {timeout} s"
        time.sleep(0.5)


def run_until_step(run_dir: Path, job: str, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(run_dir) < step:
        assert time.monotonic() < deadline, f"job {job} never reached step {step}"
        time.sleep(0.1)


@pytest.fixture
def slurm_job():
    require_service(slurm_cluster_problem())
    jobs = []
    yield jobs
    for job in jobs:  # a failed test leaves nothing running on the shared cluster
        subprocess.run(["scancel", job], capture_output=True, check=False)


@pytest.mark.slurm
def test_slurm_signals_every_step_process(root, shapes_dir, two_ranks, slurm_job):
    """``scancel --signal=TERM`` reaches each rank and its workers: the ranks checkpoint and exit 75,
    the batch script requeues the job (it was signalled, not cancelled), and the requeued run resumes."""
    path, run_dir = train_spec(root, shapes_dir, "slurm-steps")
    job = sbatch(root, path, "slurm-steps")
    slurm_job.append(job)
    run_until_step(run_dir, job, 3)
    subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=30)
    wait_until_gone(job)
    history = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    ends = [e for e in history if e["event"] == "end"]
    assert [(e["status"], e["signal"]) for e in ends] == [("preempted", "SIGTERM"), ("completed", None)], history
    output = next(root.glob(f"slurm-steps-{job}.out")).read_text()
    assert "Traceback" not in output and "start at step 0" in output
    stopped_at = int(output.split("start at step ")[2].split()[0])
    assert 3 <= stopped_at < STEPS and (run_dir / "checkpoints" / f"checkpoint{stopped_at:06d}.json").exists()
    assert_same_tensors(final_files(run_dir, STEPS), two_ranks)


@pytest.mark.slurm
def test_slurm_full_signal_loses_nothing_beyond_the_last_checkpoint(root, shapes_dir, two_ranks, slurm_job):
    """``scancel --full --signal=TERM`` also signals the batch step, srun included, and srun answers its
    own SIGTERM by killing the ranks (srun(1)): no checkpoint can be written then. What is on disk is
    complete, and the run resumes from its newest checkpoint to the same weights."""
    path, run_dir = train_spec(root, shapes_dir, "slurm-full")
    job = sbatch(root, path, "slurm-full")
    slurm_job.append(job)
    run_until_step(run_dir, job, SAVE + 3)
    subprocess.run(["scancel", "--full", "--signal=TERM", job], check=True, timeout=30)
    wait_until_gone(job)
    output = next(root.glob(f"slurm-full-{job}.out")).read_text()
    assert "Traceback" not in output and "requeuing" not in output
    resumed = idiff("train", path, "--nproc", 2, env=ENV)
    assert "start at step 0" not in resumed.stderr
    assert_same_tensors(final_files(run_dir, STEPS), two_ranks)


# ----------------------------------------------------------------------------------- sampling and NLL
def model_job(trained, name, kind, section):
    spec = {"kind": kind, "name": name, "run_dir": str(trained["root"] / name),
            kind: {"from_run": str(trained["run"]), "batch_size": 1, **section}}
    return write_spec(trained["root"] / f"{name}.yaml", spec), trained["root"] / name


def parts(folder: Path) -> int:
    return len(list(folder.glob("shard-*.npz"))) if folder.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sampling(trained, sig):
    section = {"num_samples": 16, "timestep_respacing": "50", "class_labels": "balanced"}
    reference_path, reference_dir = model_job(trained, f"sample-reference-{sig.name}", "sample", section)
    idiff_in_process("sample", reference_path, env=ENV)
    path, run_dir = model_job(trained, f"sample-{sig.name}", "sample", section)
    proc = start_idiff("sample", path, env=ENV)
    stderr = signal_group_midway(proc, lambda: parts(run_dir / "samples") >= 1, sig, "the first shard")
    assert proc.returncode == EXIT_CODES[sig], stderr[-3000:]
    assert f"stopped on {sig.name}; the run can be resumed" in stderr
    assert 1 <= parts(run_dir / "samples") < 16 and not list(run_dir.glob("samples_*.npz"))
    idiff_in_process("sample", path, env=ENV)
    with np.load(reference_dir / "samples_16x16x16x3.npz") as a, np.load(run_dir / "samples_16x16x16x3.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_nll(trained, shapes_dir):
    section = {"metrics": ["nll"], "data_dir": shapes_dir, "num_samples": 12}
    reference_path, reference_dir = model_job(trained, "nll-reference", "evaluate", section)
    idiff_in_process("evaluate", reference_path, env=ENV)
    path, run_dir = model_job(trained, "nll", "evaluate", section)
    proc = start_idiff("evaluate", path, env=ENV)
    stderr = signal_group_midway(proc, lambda: parts(run_dir / "eval" / "nll_parts") >= 1, signal.SIGINT,
                                 "the first NLL part")
    assert proc.returncode == 130, stderr[-3000:]
    assert "stopped on SIGINT; the run can be resumed" in stderr
    assert 1 <= parts(run_dir / "eval" / "nll_parts") < 12 and not (run_dir / "metrics.json").exists()
    idiff_in_process("evaluate", path, env=ENV)
    expected = json.loads((reference_dir / "eval" / "nll.json").read_text())
    assert json.loads((run_dir / "eval" / "nll.json").read_text()) == expected
