"""Run a job body on this process's rank, the same way under every launcher."""

import functools
import os
import sys
import traceback

from ..errors import EXIT_INTERRUPTED, RunFailed, UserError, report
from ..ranks.env import collective_timeout, configure_threads, init_distributed, shutdown_distributed
from ..ranks.faults import EXIT_HUNG, abort_other_ranks, all_stacks, is_fault, record_crash, record_fault
from ..ranks.watchdog import Watchdog
from ..run_dir import RunDir, check_run_dir
from ..train.training_log import check_tensorboard
from .cost import CostMeter
from .hooks import JobHooks

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, run again to continue


def job_body(kind):
    if kind == "train":
        from ..train.loop import train

        return train
    if kind == "sample":
        from ..sample import run_sample

        return run_sample
    from ..evaluate import run_evaluate

    return run_evaluate


def run_job(hooks: JobHooks) -> str:
    """Run ``hooks.spec`` on this rank (``hooks.env``): "completed" or "preempted" (a checkpoint was written
    first). The caller installed ``hooks.preemption`` and keeps it until the process ends."""
    spec, env, flag = hooks.spec, hooks.env, hooks.preemption
    hang_timeout = spec.resources.hang_timeout
    hooks.watchdog = Watchdog(functools.partial(_hung, hooks), hang_timeout).start()
    hooks.cost = CostMeter(spec, env)
    status = "failed"
    try:
        check_run_dir(spec, hooks.force_new)  # every rank, before anything is written: they all fail alike
        check_tensorboard(spec)
        configure_threads(env)
        init_distributed(env, collective_timeout(hang_timeout))
        status = job_body(spec.kind)(spec, env, hooks)
        return status
    except BaseException as err:
        _failed(hooks, err)
        raise
    finally:
        hooks.watchdog.stop()
        cost = hooks.cost.finish(status)  # every rank: their peak memory is gathered
        if hooks.lease is not None:  # taken by begin(): this job wrote the run
            RunDir(spec.run_dir).record("end", status=status, signal=flag.received, cost=cost)
            hooks.lease.release()
        if env.is_main and status == "preempted":
            print(f"idiff: stopped on {flag.received}; the run can be resumed: run the same command again "
                  f"(it continues in {spec.run_dir})", file=sys.stderr, flush=True)
        shutdown_distributed()


def _failed(hooks, err: BaseException) -> None:
    """This rank raises ``err``: a crash is recorded (and heard by ``hooks.on_fault``); under MPI every rank ends."""
    env = hooks.env
    if is_fault(err) and hooks.begun:
        fault = record_crash(hooks.spec.run_dir, env, hooks.watchdog.last_step, err)
        if hooks.on_fault is not None:
            hooks.on_fault(fault)
    if isinstance(err, Exception) and env.launcher == "mpi" and env.world_size > 1:
        # Said here, not by the command: MPI_Abort ends this process too.
        if isinstance(err, (UserError, RunFailed)):
            report(err, f"idiff (rank {env.rank})")
        else:
            traceback.print_exception(err)
        abort_other_ranks(env, getattr(err, "exit_code", 1))


def _hung(hooks, waited_s: float, step: int | None) -> None:
    """The watchdog's verdict, in its thread: the stacks and the event are recorded, then this rank ends
    (with EXIT_HUNG) while its main thread is still blocked wherever it hangs."""
    env, spec = hooks.env, hooks.spec
    try:
        print(f"idiff: rank {env.rank} made no progress for {waited_s:.0f} s (limit {hooks.watchdog.limit_s():.0f} s, "
              f"resources.hang_timeout) after step {step}: ending it (exit {EXIT_HUNG}); the run can be resumed "
              f"from its newest checkpoint", file=sys.stderr, flush=True)
        stacks = all_stacks()
        if hooks.begun:
            fault = record_fault(spec.run_dir, env, "hang", step, stacks, waited_s=round(waited_s, 1),
                                 limit_s=hooks.watchdog.limit_s())
            print(f"idiff: the stacks of rank {env.rank}'s threads are in {spec.run_dir}/{fault['dump']}",
                  file=sys.stderr, flush=True)
            if hooks.on_fault is not None:
                hooks.on_fault(fault)
        else:
            print(stacks, file=sys.stderr, flush=True)
        if hooks.lease is not None:
            RunDir(spec.run_dir).record("end", status="hung", signal=None)
            hooks.lease.release()
        abort_other_ranks(env, EXIT_HUNG)
    finally:
        os._exit(EXIT_HUNG)


def exit_code(status: str, signal_name: str | None = None) -> int:
    if status != "preempted":
        return 0
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED
