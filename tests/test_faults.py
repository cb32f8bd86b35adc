"""Faults nobody announces, in real processes: a rank that stops (SIGSTOP, as a hung GPU or a deadlock looks from
outside), a rank that raises while the others wait, rank 0 failing before the MPI rendezvous. Every rank ends
within a bound, nothing is left running, the fault is recorded where ``idiff status`` shows it, and the resumed
run ends bit for bit where an uninterrupted one does.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    TEST_ENV,
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
from test_train_resume import logged_step, wait_for

from idiff.jobspec.resources import HANG_TIMEOUT_FLOOR_S
from idiff.launch.local import GRACE_S
from idiff.ranks.faults import EXIT_HUNG
from idiff.ranks.watchdog import AUTO_MIN_S, FIRST_PROGRESS_S, Watchdog

# Processes, real training and Inception: minutes on 2 cores, so `make test-all` (and CI) runs them.
pytestmark = pytest.mark.slow

INJECTOR = str(Path(__file__).resolve().parent / "fault_injection")
STEPS, SAVE = 24, 8
HANG_TIMEOUT = HANG_TIMEOUT_FLOOR_S
# After the hang timeout: the watchdog's poll (1 s), writing the dump, the launcher's grace for the stopped rank,
# and the slowness of a shared machine.
ENDED_WITHIN_S = HANG_TIMEOUT + GRACE_S + 20
# Data-loader workers off: the processes of a run are its ranks. One thread each: they share the machine.
ENV = {"OMP_NUM_THREADS": "1"}
WAITING_CALLS = ("all_reduce", "backward", "barrier", "wait")  # where a rank waits for a stopped peer


def train_spec(root, shapes_dir, name, **train):
    spec = tiny_spec(shapes_dir, root / name, max_steps=STEPS, save_interval=SAVE, num_workers=0, **train)
    spec["resources"] = {"hang_timeout": f"{HANG_TIMEOUT:g}s"}
    return write_spec(root / f"{name}.yaml", spec), root / name


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def two_ranks(root, shapes_dir):
    """The final weights of an uninterrupted run on two ranks."""
    path, run_dir = train_spec(root, shapes_dir, "reference")
    idiff_in_process("train", path, "--nproc", 2, env=ENV)
    return final_files(run_dir, STEPS)


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "jobs.jsonl").read_text().splitlines()]


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the idiff processes below ``launcher_pid`` (its session), by their rank variables."""
    ranks = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(proc.name)) != launcher_pid or b"idiff.cli" not in (proc / "cmdline").read_bytes():
                continue
            environ = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError):
            continue
        rank = environ.get(b"OMPI_COMM_WORLD_RANK", environ.get(b"RANK"))
        if rank is not None and int(proc.name) != launcher_pid:
            ranks[int(rank)] = int(proc.name)
    return ranks


def session_left(sid: int) -> list[int]:
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            left.append(int(stat.parent.name))
    return left


def start(cmd, env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**TEST_ENV, **ENV, **(env or {})}, start_new_session=True)


def ended(proc, within: float) -> str:
    """``proc``'s stderr once it ended within ``within`` seconds, and no process of its session is left."""
    try:
        _, stderr = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running {within:.0f} s on: {proc.communicate()[1][-3000:]}") from None
    deadline = time.monotonic() + 10
    while session_left(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = session_left(proc.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes {left} outlived the run"
    return stderr


def stop_a_rank_midway(cmd, run_dir, rank: int) -> tuple[str, int]:
    """Start ``cmd``, SIGSTOP ``rank`` after step SAVE + 2; (stderr, exit code) once all ended, within the bound."""
    proc = start(cmd)
    wait_for(lambda: logged_step(run_dir) >= SAVE + 2 and len(rank_pids(proc.pid)) == 2, proc, what="step 10")
    os.kill(rank_pids(proc.pid)[rank], signal.SIGSTOP)
    return ended(proc, ENDED_WITHIN_S), proc.returncode


def assert_hang_recorded(run_dir, stderr, rank):
    hangs = [e for e in history(run_dir) if e["event"] == "hang"]
    assert hangs and hangs[0]["rank"] == rank, stderr[-3000:]
    assert SAVE + 2 <= hangs[0]["step"] < STEPS
    assert hangs[0]["limit_s"] == HANG_TIMEOUT and hangs[0]["waited_s"] >= HANG_TIMEOUT
    dump = (Path(run_dir) / hangs[0]["dump"]).read_text()
    assert "Traceback" not in stderr and f"rank {rank} made no progress" in stderr
    # The main thread's stack (the one in the training loop) names the collective it waits in.
    main = next(block for block in dump.split("\n\n") if "in train" in block)
    frames = [line for line in main.splitlines() if line.strip().startswith("File")]
    assert any(call in frames[0] for call in WAITING_CALLS), main
    return hangs[0]


def resume_and_compare(capfd, path, run_dir, reference, *launch):
    resumed = idiff_in_process("train", path, *launch, env=ENV)
    started = [line for line in (resumed.stderr + capfd.readouterr().err).splitlines() if "start at step" in line]
    assert started and "start at step 0" not in started[-1]
    assert_same_tensors(final_files(run_dir, STEPS), reference)


# ------------------------------------------------------------------------------------------- quick


@pytest.mark.parametrize("value", ["5s", "0", "ten minutes", "-1m"])
def test_a_hang_timeout_below_the_floor_or_not_a_duration_is_refused(root, shapes_dir, value):
    path, run_dir = train_spec(root, shapes_dir, "refused")
    result = idiff_in_process("train", path, "--set", f"resources.hang_timeout={value}", check=False)
    assert result.returncode == 2 and "resources.hang_timeout" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not run_dir.exists()


def test_the_default_limit_adapts_to_the_slowest_step():
    watchdog = Watchdog(lambda waited, step: None)
    assert watchdog.limit_s() == FIRST_PROGRESS_S  # start-up: imports, data, rendezvous, compilation
    watchdog.note(1)
    time.sleep(0.05)
    watchdog.note(2)
    assert watchdog.limit_s() == AUTO_MIN_S  # fast steps: the floor of the default
    assert Watchdog(lambda waited, step: None, timeout_s=42).limit_s() == FIRST_PROGRESS_S


def test_the_watchdog_fires_once_progress_stops():
    fired = []
    watchdog = Watchdog(lambda waited, step: fired.append((waited, step)), timeout_s=0.2, poll_s=0.05)
    watchdog.note(7)  # a first note: from here the fixed limit holds
    watchdog.start()
    deadline = time.monotonic() + 30
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(fired) == 1 and fired[0][0] > 0.2 and fired[0][1] == 7


# ------------------------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_a_stopped_local_rank_ends_both_and_the_run_resumes_bitwise(root, shapes_dir, two_ranks, capfd):
    path, run_dir = train_spec(root, shapes_dir, "stopped-local")
    stderr, code = stop_a_rank_midway([sys.executable, "-m", "idiff.cli", "train", path, "--nproc", "2"], run_dir, 1)
    assert code == EXIT_HUNG, stderr[-3000:]
    assert f"rank 0 hung (exit {EXIT_HUNG})" in stderr
    assert_hang_recorded(run_dir, stderr, rank=0)
    assert idiff("status", run_dir).stdout.count("hang on rank 0") == 1
    resume_and_compare(capfd, path, run_dir, two_ranks, "--nproc", 2)


@pytest.mark.slow
def test_a_rank_that_raises_ends_every_rank_with_its_name(root, shapes_dir):
    path, run_dir = train_spec(root, shapes_dir, "raises")
    proc = start([sys.executable, "-m", "idiff.cli", "train", path, "--nproc", "2"],
                 env={"PYTHONPATH": os.pathsep.join([INJECTOR, TEST_ENV.get("PYTHONPATH", "")]),
                      "IDIFF_TEST_CRASH": "1:5"})
    stderr = ended(proc, 120)
    assert proc.returncode == 1, stderr[-3000:]
    assert "rank 1 crashed at step 5: RuntimeError: injected fault at step 5" in stderr
    assert "crashed (exit 1)" in stderr  # the launcher, naming the first rank it saw end (either: they end together)
    crashes = [e for e in history(run_dir) if e["event"] == "crash"]
    assert crashes[0]["rank"] == 1 and crashes[0]["step"] == 5
    assert "injected fault" in (run_dir / crashes[0]["dump"]).read_text()


@pytest.mark.slow
@pytest.mark.mpi
def test_a_stopped_rank_under_mpiexec(root, shapes_dir, two_ranks, capfd):
    mpiexec = shutil.which("mpiexec")
    require_service(None if mpiexec else "mpiexec not found: install Open MPI (Debian: apt install openmpi-bin)")
    path, run_dir = train_spec(root, shapes_dir, "stopped-mpi")
    cmd = [mpiexec, "-n", "2", "--oversubscribe", sys.executable, "-m", "idiff.cli", "train", path]
    stderr, code = stop_a_rank_midway(cmd, run_dir, 1)
    assert code == EXIT_HUNG, stderr[-3000:]
    assert_hang_recorded(run_dir, stderr, rank=0)
    resume_and_compare(capfd, path, run_dir, two_ranks, "--nproc", 2)


@pytest.mark.slow
@pytest.mark.mpi
def test_rank_0_failing_before_the_rendezvous_does_not_hang_mpiexec(root, shapes_dir, tmp_path):
    """Rank 0 refuses its run dir (a folder of someone else's files) after MPI started, while rank 1 goes on to
    the rendezvous with it: MPI_Finalize alone would wait for rank 1 forever."""
    mpiexec = shutil.which("mpiexec")
    require_service(None if mpiexec else "mpiexec not found: install Open MPI (Debian: apt install openmpi-bin)")
    path, _ = train_spec(root, shapes_dir, "rendezvous")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not idiff's")
    rank = [sys.executable, "-m", "idiff.cli", "train", path]
    proc = start([mpiexec, "--oversubscribe", "-n", "1", *rank, "--set", f"run_dir={foreign}", ":", "-n", "1", *rank])
    stderr = ended(proc, 60)
    assert proc.returncode == 2, stderr[-3000:]
    assert "idiff (rank 0): error:" in stderr and str(foreign) in stderr


# ------------------------------------------------------------------------------------------- Slurm


def submit(path, env=None) -> str:
    result = subprocess.run([str(Path(sys.executable).parent / "idiff-submit"), str(path)], capture_output=True,
                            text=True, timeout=120, env={**TEST_ENV, **ENV, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def sacct_state(job: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return lines[-1].split()[0] if lines else "UNKNOWN"


def wait_until_over(job: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sacct_state(job) in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
            return sacct_state(job)
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} still {sacct_state(job)} after {timeout} s (cancelled)")


def slurm_rank_pid(job: str, rank: int) -> int | None:
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"submitit" not in (proc / "cmdline").read_bytes():
                continue
            environ = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except (OSError, ValueError):
            continue
        if environ.get(b"SLURM_JOB_ID") == job.encode() and environ.get(b"SLURM_PROCID") == str(rank).encode():
            return int(proc.name)
    return None


def slurm_spec(root, shapes_dir, name):
    path, run_dir = train_spec(root, shapes_dir, name)
    spec = yaml.safe_load(Path(path).read_text())
    spec["resources"].update(nodes=2, cpus_per_task=1, timeout_min=10)
    return write_spec(path, spec), run_dir


@pytest.mark.slow
@pytest.mark.slurm
def test_a_stopped_rank_under_idiff_submit_requeues_and_finishes_bitwise(root, shapes_dir, two_ranks):
    require_service(slurm_cluster_problem())
    path, run_dir = slurm_spec(root, shapes_dir, "stopped-slurm")
    job = submit(path)
    try:
        wait_for_step(run_dir, SAVE + 2, timeout=180)
        pid = slurm_rank_pid(job, 1)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        assert wait_until_over(job) == "COMPLETED"
    finally:
        subprocess.run(["scancel", job])
    events = history(run_dir)
    assert [e["restart_count"] for e in events if e["event"] == "start"] == [0, 1]
    hangs = [e for e in events if e["event"] == "hang"]
    # Rank 0 found it; the stopped rank, continued by srun's SIGCONT before its SIGKILL, may find its own too.
    assert hangs[0]["rank"] == 0 and {e["restart_count"] for e in hangs} == {0}
    assert_same_tensors(final_files(run_dir, STEPS), two_ranks)
    assert "requeues 1/10" in idiff("status", run_dir).stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_a_crash_loop_stops_after_two_tries_and_status_says_so(root, shapes_dir):
    require_service(slurm_cluster_problem())
    path, run_dir = slurm_spec(root, shapes_dir, "crash-loop")
    job = submit(path, env={"PYTHONPATH": os.pathsep.join([INJECTOR, TEST_ENV.get("PYTHONPATH", "")]),
                            "IDIFF_TEST_CRASH": f"1:{SAVE + 4}"})
    try:
        assert wait_until_over(job) == "FAILED"
    finally:
        subprocess.run(["scancel", job])
    events = history(run_dir)
    assert [e["restart_count"] for e in events if e["event"] == "start"] == [0, 1]
    first = [e for e in events if e["event"] == "crash" and e["rank"] == 1]
    assert [e["step"] for e in first] == [SAVE + 4, SAVE + 4]
    assert [e["step"] for e in events if e["event"] == "crash_loop"] == [SAVE + 4]
    status = idiff("status", run_dir).stdout
    assert f"crash loop: the crash at step {SAVE + 4} happened in two tries in a row: not requeued" in status
