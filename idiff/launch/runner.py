"""Run a job body on this process's rank, the same way under every launcher."""

import sys

import torch.distributed as dist

from ..errors import UserError
from ..jobs.io import check_run_dir, claim_run_dir
from ..run_dir import RunDir
from .env import detect_rank_env, init_distributed, shutdown_distributed
from .signals import PreemptionFlag

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


def run_job(spec, *, force_new: bool = False, preemption: PreemptionFlag | None = None, env=None) -> str:
    """Run ``spec`` on this rank: "completed" or "preempted" (a checkpoint was written first)."""
    env = env or detect_rank_env()
    check_run_dir(spec, force_new)  # every rank, before anything is written: they all fail alike
    flag = preemption or PreemptionFlag().install()
    init_distributed(env)
    try:
        if env.is_main:
            claim_run_dir(spec, force_new)
        if env.world_size > 1:
            dist.barrier()
        run_dir = RunDir(spec.run_dir)
        if env.is_main:
            run_dir.record("start", kind=spec.kind, launcher=env.launcher, world_size=env.world_size,
                           slurm_job_id=env.slurm_job_id, restart_count=env.restart_count)
        status = "failed"
        try:
            status = job_body(spec.kind)(spec, env, should_suspend=lambda: flag.received is not None)
        finally:
            if env.is_main:
                run_dir.record("end", status=status, signal=flag.received)
        return status
    finally:
        if preemption is None:
            flag.uninstall()
        shutdown_distributed()


def exit_code(status: str) -> int:
    return EXIT_PREEMPTED if status == "preempted" else 0


def report_user_error(err: UserError, prog: str = "idiff") -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return err.exit_code
