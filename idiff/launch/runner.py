"""Run a job body on this process's rank, the same way under every launcher."""

import sys

import torch.distributed as dist

from ..dist.env import configure_threads, detect_rank_env, init_distributed, shutdown_distributed
from ..dist.signals import PreemptionFlag
from ..errors import EXIT_INTERRUPTED
from ..run_dir import RunDir, check_run_dir, claim_run_dir
from ..train.metrics import check_tensorboard

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


class JobHooks:
    """What a job body calls back: ``begin()`` once its inputs are checked (rank 0 takes the run dir,
    the others wait), ``should_suspend()`` at every step boundary, and, in training, ``checkpoint_written(step)``."""

    def __init__(self, spec, env, *, force_new=False, preemption: PreemptionFlag | None = None):
        self.spec, self.env, self.force_new, self.preemption = spec, env, force_new, preemption
        self.lease = None  # rank 0's hold on the run dir, from begin() to the end of the job

    def begin(self) -> RunDir:
        if self.env.is_main:
            run_dir = claim_run_dir(self.spec, self.force_new, hold=True)
            self.lease = run_dir.lease
            run_dir.record("start", kind=self.spec.kind, launcher=self.env.launcher, world_size=self.env.world_size,
                           slurm_job_id=self.env.slurm_job_id, restart_count=self.env.restart_count)
        if self.env.world_size > 1:
            dist.barrier()
        return RunDir(self.spec.run_dir)

    def should_suspend(self) -> bool:
        return self.preemption is not None and self.preemption.received is not None

    def checkpoint_written(self, step: int) -> None:
        """Checkpoint ``step`` is complete: its manifest is written, so its files may be read.

        Rank 0 calls it in the training thread. Checkpoints are written in the background, so the call comes at
        the first step boundary after the write ended, or when the loop waits for a write (at the end of the run,
        on preemption, before the next checkpoint): at most one step after the write ended, never before.
        """


def hooks_class(spec) -> type:
    """JobHooks, or for a training run with train.evaluate the hooks that evaluate its checkpoints."""
    if spec.kind == "train" and spec.train.evaluate is not None:
        from .evaluations import EvaluatingHooks

        return EvaluatingHooks
    return JobHooks


def run_job(spec, *, force_new: bool = False, preemption: PreemptionFlag | None = None, env=None) -> str:
    """Run ``spec`` on this rank: "completed" or "preempted" (a checkpoint was written first)."""
    env = env or detect_rank_env()
    check_run_dir(spec, force_new)  # every rank, before anything is written: they all fail alike
    check_tensorboard(spec)
    flag = preemption or PreemptionFlag().install()
    configure_threads(env)
    init_distributed(env)
    status = "failed"
    hooks = hooks_class(spec)(spec, env, force_new=force_new, preemption=flag)
    try:
        status = job_body(spec.kind)(spec, env, hooks)
        return status
    finally:
        if hooks.lease is not None:  # taken by begin(): this job wrote the run
            RunDir(spec.run_dir).record("end", status=status, signal=flag.received)
            hooks.lease.release()
        if env.is_main and status == "preempted":
            print(f"idiff: stopped on {flag.received}; the run can be resumed: run the same command again "
                  f"(it continues in {spec.run_dir})", file=sys.stderr, flush=True)
        if preemption is None:
            flag.uninstall()
        shutdown_distributed()


def exit_code(status: str, signal_name: str | None = None) -> int:
    if status != "preempted":
        return 0
    return EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED
