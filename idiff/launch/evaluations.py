"""The jobs of ``train.evaluate`` (see idiff.train.evaluations): the hooks that start an evaluation when a
checkpoint is complete, as Slurm jobs of their own under idiff-submit or as subprocesses after the checkpoint
elsewhere, and the Slurm job that records its result."""

import json
import os
import subprocess
import sys

import submitit

from .. import storage
from ..errors import UserError
from ..run_dir import RunDir, utc_now
from ..spec.load import dump_spec
from ..train.evaluations import SUBMITTED, evaluated_steps, evaluation_specs, record_evaluation
from .runner import JobHooks
from .submit import SubmittedJob, submit_one

# Variables that make a process a rank of a launcher: a local evaluation is a job of its own, one rank.
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "SUBMITIT_")
_LAUNCHER_VARIABLES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "IDIFF_LAUNCHER"}


class RecordedEvaluation(SubmittedJob):
    """The Slurm job of an evaluation: the evaluate job, then (rank 0) its row in the training run's evals.jsonl."""

    def __init__(self, spec_data: dict, train_run_dir: str, step: int):
        super().__init__(spec_data)
        self.train_run_dir, self.step = train_run_dir, step

    def __call__(self):
        status = super().__call__()  # a preempted evaluation exits inside, to be requeued
        job = submitit.JobEnvironment()
        if job.global_rank == 0:
            record_evaluation(self.train_run_dir, self.step, self.spec_data["run_dir"], job.job_id)
        return status

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(RecordedEvaluation(self.spec_data, self.train_run_dir, self.step))


class EvaluatingHooks(JobHooks):
    """JobHooks of a training job with ``train.evaluate``: evaluates its checkpoints as they complete."""

    def checkpoint_written(self, step: int) -> None:
        super().checkpoint_written(step)
        every = self.spec.train.evaluate.every
        if step % every:
            return
        run_dir = RunDir(self.spec.run_dir)
        folder = run_dir.evaluation(step)
        if step in evaluated_steps(run_dir.path) or storage.exists(storage.join(folder, SUBMITTED)):
            print(f"idiff: step {step} was evaluated before (evals.jsonl, {folder}): not again",
                  file=sys.stderr, flush=True)
            return
        specs = evaluation_specs(self.spec, step)
        if self.env.launcher == "submitit" and self.env.slurm_job_id:
            self._submit(step, specs, folder)
        else:
            self._run_here(step, specs, folder)

    def _submit(self, step, specs, folder) -> None:
        job_ids: list[str] = []
        try:
            # The training job's SLURM_* variables would otherwise pass into the new jobs' sbatch and srun.
            with submitit.helpers.clean_env():
                for spec in specs:
                    data = spec.model_dump(mode="json")
                    job = RecordedEvaluation(data, self.spec.run_dir, step) if spec.kind == "evaluate" else None
                    job_ids.append(submit_one(spec, local=False, force_new=False, out=sys.stderr, job=job,
                                              after=job_ids[-1] if job_ids else None))
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

