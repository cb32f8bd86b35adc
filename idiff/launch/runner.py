"""Run a job body on this process's rank, the same way under every launcher."""

import sys

from ..errors import EXIT_INTERRUPTED
from ..ranks.env import configure_threads, init_distributed, shutdown_distributed
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
    check_run_dir(spec, hooks.force_new)  # every rank, before anything is written: they all fail alike
    check_tensorboard(spec)
    hooks.cost = CostMeter(spec, env)
    configure_threads(env)
    init_distributed(env)
    status = "failed"
    try:
        status = job_body(spec.kind)(spec, env, hooks)
        return status
    finally:
        cost = hooks.cost.finish(status)  # every rank: their peak memory is gathered
        if hooks.lease is not None:  # taken by begin(): this job wrote the run
            RunDir(spec.run_dir).record("end", status=status, signal=flag.received, cost=cost)
            hooks.lease.release()
        if env.is_main and status == "preempted":
            print(f"idiff: stopped on {flag.received}; the run can be resumed: run the same command again "
                  f"(it continues in {spec.run_dir})", file=sys.stderr, flush=True)
        shutdown_distributed()


def exit_code(status: str, signal_name: str | None = None) -> int:
    if status != "preempted":
        return 0
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED
