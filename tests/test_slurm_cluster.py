"""The local two-node Slurm cluster of slurm/start-cluster.sh, and the preemption path of
slurm/train.sbatch: the pre-timeout USR2 reaches every rank, exit code 75 requeues the job, the
requeued run finishes, and a user's scancel is not undone.

idiff itself is replaced by a stand-in (the script's IDIFF variable) that behaves like a
preempted job: it waits for USR2 or TERM, then exits 75; after a requeue it exits 0 at once.
"""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SLURM_NODES as NODES
from conftest import require_service, slurm_cluster_problem

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
# sacct's first word for states a job does not leave (CANCELLED comes as "CANCELLED by UID").
FINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT",
}

STAND_IN = """#!/bin/bash
[[ $1 == srun-prefix ]] && exit 0  # asked for the spec's container: there is none
log=$STAND_IN_LOG
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then
  sleep 300 &
  sleeper=$!
  trap 'echo "usr2 $SLURM_PROCID" >>"$log"; kill "$sleeper" 2>/dev/null; exit 75' USR2
  trap 'echo "term $SLURM_PROCID" >>"$log"; kill "$sleeper" 2>/dev/null; exit 75' TERM
  echo "ready $SLURM_PROCID" >>"$log"
  wait "$sleeper"
  echo "no signal $SLURM_PROCID" >>"$log"
  exit 1
fi
echo "resumed $SLURM_PROCID $*" >>"$log"
"""


def run(*cmd: str, timeout: float = 30, **kwargs) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module", autouse=True)
def cluster():
    require_service(slurm_cluster_problem())


def sacct_states(job: str, all_runs: bool = False) -> list[str]:
    """Accounting states of a job's runs, oldest first; the latest alone unless all_runs.

    sacct rather than scontrol: scontrol forgets a job MinJobAge after it ends, and the state
    cached by tools such as submitit lags behind.
    """
    cmd = ["sacct", "-X", "-n", "-P", "-o", "State", "-j", job] + (["-D"] if all_runs else [])
    return [line for line in run(*cmd).splitlines() if line]


def wait_for_state(job: str, want: str, timeout: float, output: Path | None = None) -> None:
    """Poll sacct until the job's latest run is in state `want`; fail early on another final one."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        states = sacct_states(job)
        state = states[-1] if states else ""
        if state.split(" ")[0] == want:
            return
        if state.split(" ")[0] in FINAL_STATES:
            break
        time.sleep(0.5)
    log = output.read_text() if output and output.exists() else "(no output file)"
    pytest.fail(f"job {job} is {state or 'unknown'} after waiting for {want}; its output:\n{log}")


def restarts(job: str) -> int:
    match = re.search(r"\bRestarts=(\d+)", run("scontrol", "show", "job", "-o", job))
    assert match, f"scontrol shows no Restarts= for job {job}"
    return int(match[1])


def wait_for_lines(path: Path, prefix: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and sum(ln.startswith(prefix) for ln in path.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    pytest.fail(f"no {count} '{prefix}' lines in {path} after {timeout} s")


class TrainJob:
    """slurm/train.sbatch on both nodes, one rank each, with the stand-in as idiff."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.log = tmp_path / "stand-in.log"
        self.stand_in = tmp_path / "idiff-stand-in"
        self.stand_in.write_text(STAND_IN)
        self.stand_in.chmod(0o755)
        self.id = ""

    @property
    def output(self) -> Path:
        return self.dir / f"slurm-{self.id}.out"

    def submit(self, *sbatch_options: str) -> str:
        env = {**os.environ, "IDIFF": str(self.stand_in), "STAND_IN_LOG": str(self.log)}
        self.id = run(
            "sbatch", "--parsable", "--job-name=idiff-test", "--nodes=2", "--ntasks-per-node=1",
            "--gpus-per-node=0", "--cpus-per-task=1", f"--output={self.dir}/slurm-%j.out",
            *sbatch_options, str(TRAIN_SBATCH), "spec.yaml", "--some-flag", "1",
            cwd=self.dir, env=env,
        ).strip().split(";")[0]
        return self.id

    def lines(self) -> list[str]:
        return sorted(self.log.read_text().splitlines()) if self.log.exists() else []


@pytest.fixture
def train_job(tmp_path):
    job = TrainJob(tmp_path)
    yield job
    if job.id:  # a failed test leaves nothing running on the shared cluster
        subprocess.run(["scancel", job.id], capture_output=True)


def test_both_nodes_are_up():
    # idle, or running someone else's jobs (the cluster is shared); not down, drained or silent
    listing = run("sinfo", "-h", "-N", "-o", "%N %t")
    states = dict(line.split() for line in sorted(set(listing.splitlines())))
    for node in NODES:
        assert states.get(node) in {"idle", "mix", "alloc"}, f"sinfo -N:\n{listing}"


def test_a_job_step_spans_both_nodes():
    out = run("srun", "-N2", "-n2", "-t", "1", "--immediate=30", "printenv", "SLURMD_NODENAME",
              timeout=60)
    assert sorted(out.split()) == list(NODES)


def expect_requeued_once(job: TrainJob) -> None:
    assert job.lines() == [
        "ready 0", "ready 1",
        "resumed 0 train spec.yaml --some-flag 1", "resumed 1 train spec.yaml --some-flag 1",
        "usr2 0", "usr2 1",
    ], job.output.read_text()
    assert restarts(job.id) == 1
    assert sacct_states(job.id, all_runs=True) == ["REQUEUED", "COMPLETED"]


def test_usr2_to_the_batch_script_requeues_and_the_job_finishes(train_job):
    # --batch delivers USR2 the way --signal=B:USR2@S does: to the batch shell only.
    train_job.submit("--time=2")
    wait_for_lines(train_job.log, "ready", 2, timeout=30)
    run("scancel", "--batch", "--signal=USR2", train_job.id)
    # requeue takes ~11 s with the cluster's cred_expire=10 and 1 s scheduler interval
    wait_for_state(train_job.id, "COMPLETED", timeout=45, output=train_job.output)
    expect_requeued_once(train_job)


def test_pre_timeout_signal_requeues_and_the_job_finishes(train_job):
    # slurmctld looks at time limits every ~30 s and sends the signal early rather than late:
    # with a 60 s limit, B:USR2@20 arrives 10-40 s after the start, before the limit.
    train_job.submit("--time=1", "--signal=B:USR2@20")
    wait_for_state(train_job.id, "COMPLETED", timeout=90, output=train_job.output)
    expect_requeued_once(train_job)


def test_scancel_is_not_undone_by_a_requeue(train_job):
    train_job.submit("--time=2")
    wait_for_lines(train_job.log, "ready", 2, timeout=30)
    run("scancel", train_job.id)
    wait_for_state(train_job.id, "CANCELLED", timeout=30, output=train_job.output)
    time.sleep(2)  # a wrong requeue would show by now
    assert sacct_states(train_job.id, all_runs=True)[-1].startswith("CANCELLED")
    assert restarts(train_job.id) == 0
    assert train_job.lines() == ["ready 0", "ready 1", "term 0", "term 1"]
