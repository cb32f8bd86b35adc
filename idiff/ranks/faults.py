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
    first = (_tries(RunDir(run_dir).history())[-1] or [fault])[0]
    echo = f" after the {first['event']} of rank {first.get('rank')}" if first.get("rank") != env.rank else ""
    print(f"idiff: rank {env.rank} crashed at step {step}{echo}: {fault['error']} (traceback in "
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


def why_not_requeue(run_dir: str, fault: dict) -> str | None:
    """Why the job must not be requeued after ``fault``, this rank's (None: requeue it). A crash loop is recorded."""
    history = RunDir(run_dir).history()
    if not first_of_its_try(history, fault):
        return "an earlier fault of this try decides"
    if repeats_last_try(history, fault):
        RunDir(run_dir).record("crash_loop", rank=fault["rank"], step=fault.get("step"), fault=fault["event"],
                               error=fault.get("error"), slurm_job_id=fault.get("slurm_job_id"))
        return (f"crash loop: the same {fault['event']} at step {fault.get('step')} as in the try before; "
                f"requeueing would repeat it")
    return None


def _dump_head(run_dir: str, event: dict, lines: int = 3) -> list[str]:
    """The first frames of the thread that ran the job (a hang), or the innermost of the traceback (a crash)."""
    # The name comes from jobs.jsonl, untrusted: only a plain file name inside faults/ is read.
    folder, _, name = str(event.get("dump", "")).partition("/")
    if folder != "faults" or storage.unsafe_name_reason(name) is not None:
        return []
    path = storage.join(run_dir, "faults", name)
    try:
        text = storage.read_text(path)
    except (OSError, ValueError):
        return []
    if event["event"] == "hang":
        main = next((block for block in text.split("\n\n") if "in run_job" in block), "")
        return [line.strip() for line in main.splitlines() if line.strip().startswith("File")][:lines]
    return [line.strip() for line in text.splitlines() if line.strip().startswith("File")][-lines:]


def fault_lines(run_dir: str, history: list[dict], max_requeues: int) -> list[str]:
    """``idiff status``'s lines on the run's faults: each hang and crash, the requeues, a crash loop."""
    faults = [e for e in history if e["event"] in FAULTS]
    loops = [e for e in history if e["event"] == "crash_loop"]
    if not faults:
        return []
    requeues = max((e.get("restart_count") or 0 for e in history if e["event"] == "start"), default=0)
    lines = [f"faults: {len(faults)}; requeues {requeues}/{max_requeues} (resources.max_requeues)"]
    for event in faults:
        what = event.get("error") or f"no progress for {event.get('waited_s')} s"
        job = f", slurm job {event['slurm_job_id']} try {(event.get('restart_count') or 0) + 1}" \
            if event.get("slurm_job_id") else ""
        lines.append(f"  {event['event']} on rank {event.get('rank')} at step {event.get('step')}{job}, "
                     f"{event['time']}: {what} ({event.get('dump')})")
        lines += [f"      {frame}" for frame in _dump_head(run_dir, event)]
    for event in loops:
        lines.append(f"  crash loop: the {event.get('fault')} at step {event.get('step')} happened in two tries in a "
                     f"row: not requeued; fix its cause, then `idiff-resume {run_dir}`")
    return lines
