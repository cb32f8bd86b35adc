"""Faults that nobody announces: a rank that hangs or crashes. What each leaves behind, and what it decides.

A fault is one line of the run's ``jobs.jsonl`` (event ``hang`` or ``crash``: the rank, the last step it
noted, the error) and a text file ``faults/<job>-<rank>.txt`` with every thread's stack (a hang, from
faulthandler) or the traceback (a crash). The rank that meets the fault writes both: it is alive, while the
rank that caused a hang may be stopped for good.

Only the first fault of a try decides what follows (a requeue, or not): when one rank crashes, the others
then fail in their collectives, and those later faults are its echoes. A try is what follows a ``start``
event. The first fault of a try that repeats a fault of the try before (the same kind, step and error) is
a crash loop: requeueing again would only repeat it.
"""

import faulthandler
import os
import sys
import tempfile
import traceback

from .. import storage
from ..errors import RunFailed, UserError
from ..run_dir import RunDir, utc_now
from .env import RankEnv

EXIT_HUNG = 76  # a rank made no progress for resources.hang_timeout; its stacks are in faults/
FAULTS = ("hang", "crash")
# What a rank's exit code says, for the launcher's message (docs/faults.md lists them all).
EXIT_MEANINGS = {1: "crashed", 2: "refused its input", 75: "was preempted", EXIT_HUNG: "hung", 130: "was interrupted"}


def exit_meaning(code: int) -> str:
    if code > 128:
        return f"was killed by signal {code - 128}"
    return EXIT_MEANINGS.get(code, "failed")


def is_fault(err: BaseException) -> bool:
    """A crash, as opposed to bad input or a run that stopped on purpose (divergence), which a retry repeats."""
    return isinstance(err, Exception) and not isinstance(err, (UserError, RunFailed))


def _job_label(env: RankEnv) -> str:
    if env.slurm_job_id:
        return f"{env.slurm_job_id}.{env.restart_count}" if env.restart_count else str(env.slurm_job_id)
    return f"local{os.getppid()}"  # the launcher's process: shared by the ranks of one local start


def all_stacks() -> str:
    """Every thread's Python stack, as faulthandler writes it (it needs a file descriptor)."""
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(f, all_threads=True)
        f.seek(0)
        return f.read()


def record_fault(run_dir: str, env: RankEnv, kind: str, step: int | None, text: str, **fields) -> dict:
    """Write the fault's file and its ``jobs.jsonl`` line; returns the event as recorded."""
    folder = storage.join(run_dir, "faults")
    storage.makedirs(folder)
    name = f"{_job_label(env)}-{env.rank}.txt"
    header = f"idiff {kind} on rank {env.rank}/{env.world_size} at step {step}, {utc_now()}\n"
    storage.atomic_write_text(storage.join(folder, name), header + text)
    fault = dict(rank=env.rank, step=step, slurm_job_id=env.slurm_job_id, restart_count=env.restart_count,
                 dump=f"faults/{name}", **fields)
    RunDir(run_dir).record(kind, **fault)
    return {"event": kind, **fault}


def record_crash(run_dir: str, env: RankEnv, step: int | None, err: BaseException) -> dict:
    text = "".join(traceback.format_exception(err))
    fault = record_fault(run_dir, env, "crash", step, text, error=f"{type(err).__name__}: {err}"[:500])
    print(f"idiff: rank {env.rank} crashed at step {step}: {fault['error']} (traceback in "
          f"{storage.join(run_dir, fault['dump'])})", file=sys.stderr, flush=True)
    return fault


def _signature(event: dict) -> tuple:
    return event["event"], event.get("step"), event.get("error")


def _tries(history: list[dict]) -> list[list[dict]]:
    """The faults of each try, oldest first (a try begins at a ``start`` event)."""
    tries: list[list[dict]] = [[]]
    for event in history:
        if event["event"] == "start":
            tries.append([])
        elif event["event"] in FAULTS:
            tries[-1].append(event)
    return tries


def first_of_its_try(history: list[dict], fault: dict) -> bool:
    current = _tries(history)[-1]
    return bool(current) and _signature(current[0]) == _signature(fault) and current[0].get("rank") == fault["rank"]


def repeats_last_try(history: list[dict], fault: dict) -> bool:
    """Whether ``fault`` happened in the try before too: a crash loop."""
    tries = _tries(history)
    return len(tries) >= 2 and any(_signature(f) == _signature(fault) for f in tries[-2])


def abort_other_ranks(env: RankEnv, code: int) -> None:
    """Under MPI, end every rank now: a rank that just exits leaves mpiexec waiting (MPI_Finalize waits for
    ranks that may be blocked in a rendezvous with this one). Elsewhere nothing: the launchers end the rest."""
    if env.launcher != "mpi" or env.world_size == 1:
        return
    from mpi4py import MPI

    sys.stderr.flush()
    MPI.COMM_WORLD.Abort(code)
