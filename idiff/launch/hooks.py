"""What a job body calls back (EDM2's lifecycle hooks): ``begin()`` once its inputs are checked,
``should_suspend()`` at every step boundary, ``progress(step)`` after each step (shard, part) for the hang
watchdog, and in training ``checkpoint_written(step)``.

A launcher builds the hooks and hands them to ``runner.run_job``. A training run with ``train.evaluate``
gets ``EvaluatingHooks``: each checkpoint it completes is evaluated, here in a subprocess after the
checkpoint, or, when the launcher gives it a ``submit_evaluations`` function (idiff-submit on Slurm), as
Slurm jobs of their own.
"""

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch.distributed as dist

from .. import storage
from ..errors import UserError
from ..jobspec.load import dump_spec
from ..ranks.signals import PreemptionFlag
from ..run_dir import RunDir, claim_run_dir, utc_now
from ..train.checkpoint_evaluations import SUBMITTED, evaluated_steps, evaluation_specs, record_evaluation

# Variables that make a process a rank of a launcher: a local evaluation is a job of its own, one rank.
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "SUBMITIT_")
_LAUNCHER_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "IDIFF_LAUNCHER"}

# (training spec, step, the sample/evaluate specs of that step) -> the Slurm job ids; UserError if refused
SubmitEvaluations = Callable[[object, int, list], list[str]]


class JobHooks:
    """The hooks of one rank's job: rank 0 takes the run dir in ``begin()``, the others wait for it."""

    def __init__(self, spec, env, *, force_new=False, preemption: PreemptionFlag | None = None):
        self.spec, self.env, self.force_new, self.preemption = spec, env, force_new, preemption
        self.lease = None  # rank 0's hold on the run dir, from begin() to the end of the job
        self.cost = None  # the job's cost.CostMeter, from runner.run_job
        self.begun = False  # the run dir is this job's: faults may be recorded in it
        self.watchdog = None  # ranks.watchdog.Watchdog, while runner.run_job runs the body
        self.on_fault = None  # called with the event of a fault this rank recorded (idiff-submit requeues)

    def begin(self) -> RunDir:
        if self.env.is_main:
            run_dir = claim_run_dir(self.spec, self.force_new, hold=True)
            self.lease = run_dir.lease
            run_dir.record("start", kind=self.spec.kind, launcher=self.env.launcher, world_size=self.env.world_size,
                           slurm_job_id=self.env.slurm_job_id, restart_count=self.env.restart_count)
        if self.env.world_size > 1:
            dist.barrier()
        self.begun = True
        return RunDir(self.spec.run_dir)

    def progress(self, step: int) -> None:
        """This rank completed ``step`` (a training step; in sampling and NLL, the first index of a shard)."""
        if self.watchdog is not None:
            self.watchdog.note(step)

    def waiting_for_others(self) -> None:
        """This rank's own work is done (its shards): what is left is waiting for the other ranks, which have
        more to do when a resumed run left them more, and whose own watchdogs watch them."""
        if self.watchdog is not None:
            self.watchdog.stop()

    def should_suspend(self) -> bool:
        return self.preemption is not None and self.preemption.received is not None

    def checkpoint_written(self, step: int) -> None:
        """Checkpoint ``step`` is complete: its manifest is written, so its files may be read.

        Rank 0 calls it in the training thread. Checkpoints are written in the background, so the call comes at
        the first step boundary after the write ended, or when the loop waits for a write (at the end of the run,
        on preemption, before the next checkpoint): at most one step after the write ended, never before.
        """


class EvaluatingHooks(JobHooks):
    """JobHooks of a training job with ``train.evaluate``: evaluates its checkpoints as they complete."""

    def __init__(self, spec, env, *, submit_evaluations: SubmitEvaluations | None = None, **kwargs):
        super().__init__(spec, env, **kwargs)
        self.submit_evaluations = submit_evaluations

    def checkpoint_written(self, step: int) -> None:
        super().checkpoint_written(step)
        if step % self.spec.train.evaluate.every:
            return
        run_dir = RunDir(self.spec.run_dir)
        folder = run_dir.evaluation(step)
        if step in evaluated_steps(run_dir.path) or storage.exists(storage.join(folder, SUBMITTED)):
            print(f"idiff: step {step} was evaluated before (evals.jsonl, {folder}): not again",
                  file=sys.stderr, flush=True)
            return
        specs = evaluation_specs(self.spec, step)
        if self.submit_evaluations is not None:
            self._submit(step, specs, folder)
        else:
            self._run_here(step, specs, folder)

    def _submit(self, step, specs, folder) -> None:
        try:
            job_ids = self.submit_evaluations(self.spec, step, specs)
        except UserError as err:  # the scheduler refused: training goes on without this evaluation
            print(f"idiff: could not submit the evaluation of checkpoint {step} ({err}); training goes on",
                  file=sys.stderr, flush=True)
            return
        storage.atomic_write_text(storage.join(folder, SUBMITTED), json.dumps(
            {"step": step, "job_ids": job_ids, "time": utc_now(), "by": self.env.slurm_job_id}))
        RunDir(self.spec.run_dir).record("evaluation", step=step, slurm_job_ids=job_ids)

    def _run_here(self, step, specs, folder) -> None:
        environ = {k: v for k, v in os.environ.items()
                   if k not in _LAUNCHER_VARIABLES and not k.startswith(_LAUNCHER_PREFIXES)}
        print(f"idiff: evaluating checkpoint {step} ({', '.join(self.spec.train.evaluate.metrics)})",
              file=sys.stderr, flush=True)
        storage.makedirs(folder)
        started = time.monotonic()
        try:
            self._evaluate_here(step, specs, folder, environ)
        finally:
            if self.cost is not None:
                self.cost.evaluation_s += time.monotonic() - started

    def _evaluate_here(self, step, specs, folder, environ) -> None:
        for spec in specs:
            path = storage.join(folder, f"{spec.kind}.yaml")
            storage.atomic_write_text(path, dump_spec(spec))
            # Its lines (progress, the results' JSON) belong in the training's log: stderr, file descriptor 2.
            result = subprocess.run([sys.executable, "-m", "idiff.cli", spec.kind, path], env=environ, stdout=2)
            if result.returncode != 0:
                # Training goes on without this evaluation; its specs stay, to be run by hand.
                print(f"idiff: the evaluation of checkpoint {step} failed ({spec.kind} exited {result.returncode}, "
                      f"output above); training goes on. Run it again with `idiff {spec.kind} {path}`",
                      file=sys.stderr, flush=True)
                return
        record_evaluation(self.spec.run_dir, step, specs[-1].run_dir, None)


def hooks_for(spec, env, *, force_new=False, preemption: PreemptionFlag | None = None,
              submit_evaluations: SubmitEvaluations | None = None) -> JobHooks:
    """The hooks of ``spec``'s job on this rank."""
    if spec.kind == "train" and spec.train.evaluate is not None:
        return EvaluatingHooks(spec, env, force_new=force_new, preemption=preemption,
                               submit_evaluations=submit_evaluations)
    return JobHooks(spec, env, force_new=force_new, preemption=preemption)
