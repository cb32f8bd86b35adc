"""``idiff-submit`` and ``idiff-resume``: jobs on Slurm through submitit, requeued after preemption.

The submitted callable replaces submitit's own USR2 handler, which would checkpoint inside the
signal handler on global rank 0 alone, mid-step, and leave the other ranks in a collective. Here
the signal only sets the flag; all ranks agree at a step boundary, checkpoint, and only then does
rank 0 requeue the job (after SIGUSR2; on SIGTERM Slurm itself is preempting or cancelling it).
"""

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import submitit
import yaml

from .. import storage
from ..errors import UserError
from ..jobspec.load import dump_spec, parse_spec
from ..jobspec.resources import refuse_control_characters
from ..ranks.env import RankEnv, port_for_job
from ..ranks.faults import why_not_requeue
from ..ranks.signals import PreemptionFlag
from ..run_dir import CHAIN_EVENT, RunDir, check_run_dir, claim_run_dir
from ..train.checkpoint_evaluations import record_evaluation
from .chain import Stage, chain_record, check_chain
from .container import REQUEUE_MARKER, check_container, container_setup, srun_options, wrap
from .hooks import hooks_for
from .runner import EXIT_PREEMPTED, run_job


def rank_env_from_submitit() -> RankEnv:
    """The rank environment of a submitit task (Slurm or local executor)."""
    job = submitit.JobEnvironment()
    on_slurm = "SLURM_JOB_ID" in os.environ
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    return RankEnv(
        rank=job.global_rank, world_size=job.num_tasks, local_rank=job.local_rank,
        local_world_size=max(1, job.num_tasks // job.num_nodes), launcher="submitit",
        master_addr=job.hostnames[0] if on_slurm else "127.0.0.1", master_port=port_for_job(job.job_id, restarts),
        slurm_job_id=job.job_id if on_slurm else None, restart_count=restarts,
    )


class SubmittedJob(submitit.helpers.Checkpointable):
    """What runs on every task: the job body, then (rank 0) a requeue if it was preempted by USR2."""

    def __init__(self, spec_data: dict):
        self.spec_data = spec_data

    def __call__(self):
        env = rank_env_from_submitit()
        flag = PreemptionFlag(announce=env.is_main).install()  # after submitit's handlers: ours win
        spec = parse_spec(self.spec_data, source="submitted spec")
        # idiff-submit took the run dir (moving an old run aside if asked) before the job existed: every
        # start, requeues included, resumes that run.
        on_slurm = env.slurm_job_id is not None
        hooks = hooks_for(spec, env, preemption=flag, submit_evaluations=submit_evaluation_jobs if on_slurm else None)
        if on_slurm:
            hooks.on_fault = functools.partial(self._requeue_after_fault, env, spec)
        status = run_job(hooks)
        if status != "preempted":
            return status
        if env.is_main and flag.received == "SIGUSR2" and env.slurm_job_id:
            self._requeue(env, spec)
        sys.exit(EXIT_PREEMPTED)  # no result file: the job is not over

    @staticmethod
    def _requeue(env: RankEnv, spec) -> None:
        limit = spec.resources.max_requeues
        if env.restart_count >= limit:
            print(f"idiff: not requeued: {env.restart_count} requeues reached resources.max_requeues={limit}; "
                  f"continue with `idiff-resume {spec.run_dir}`", file=sys.stderr, flush=True)
            return
        job = submitit.JobEnvironment()
        if spec.resources.container is not None:
            # No scontrol in the image: the batch script requeues on its way out (container_setup).
            (job.paths.folder / REQUEUE_MARKER).touch()
        else:
            job._requeue(limit - env.restart_count)

    @classmethod
    def _requeue_after_fault(cls, env: RankEnv, spec, fault: dict) -> None:
        """A hang or a crash on this rank (which then ends, and srun ends the others): requeued as a preemption
        is, unless it is a crash loop (docs/faults.md)."""
        why = why_not_requeue(spec.run_dir, fault)
        if why is not None:
            print(f"idiff: not requeued: {why}", file=sys.stderr, flush=True)
            return
        try:
            cls._requeue(env, spec)
        except (OSError, subprocess.SubprocessError) as err:  # another rank's fault requeued it first
            print(f"idiff: requeue after the {fault['event']} failed: {err}", file=sys.stderr, flush=True)

    def checkpoint(self, *args, **kwargs):
        """Used only if Slurm's own machinery asks: the run dir holds the state, so resubmit as is."""
        return submitit.helpers.DelayedSubmission(SubmittedJob(self.spec_data))


class RecordedEvaluation(SubmittedJob):
    """The Slurm job of an evaluation during training: the evaluate job, then (rank 0) its row in the training
    run's evals.jsonl."""

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


def submit_evaluation_jobs(train_spec, step: int, specs: list) -> list[str]:
    """Submit the sample/evaluate ``specs`` of checkpoint ``step`` of a training job running on Slurm, each
    after the previous one; returns their job ids."""
    job_ids: list[str] = []
    # The training job's SLURM_* variables would otherwise pass into the new jobs' sbatch and srun.
    with submitit.helpers.clean_env():
        for spec in specs:
            job = RecordedEvaluation(spec.model_dump(mode="json"), train_spec.run_dir, step) \
                if spec.kind == "evaluate" else None
            job_ids.append(submit_one(spec, local=False, force_new=False, out=sys.stderr, job=job,
                                      after=job_ids[-1] if job_ids else None))
    return job_ids


KILL_ON_BAD_EXIT = "--kill-on-bad-exit=1"  # srun ends every rank of a job when one exits abnormally


def _jobs_folder(spec) -> str:
    """submitit's folder of each of ``spec``'s jobs (``%j``: the job id)."""
    base = spec.run_dir if not storage.is_remote(spec.run_dir) else "slurm-logs"
    return os.path.abspath(os.path.join(base, "slurm", "%j"))


def executor_parameters(spec, cluster: str, after: str | None = None, dependency: str = "afterok") -> dict:
    """submitit's parameters of ``spec``'s job on ``cluster`` ("slurm" or "local"); ``after``: the Slurm job it
    waits for (``dependency``: afterok, or aftercorr between the job arrays of a sweep), in a chain. Pure: a dry
    run prints them where no Slurm is reachable."""
    r = spec.resources
    # Locally, the ranks of every node run on this one machine (training is world-size independent).
    nodes, ranks_per_node = (r.nodes, r.ranks_per_node) if cluster == "slurm" else (1, r.world_size)
    params = dict(name=spec.name, nodes=nodes, tasks_per_node=ranks_per_node, cpus_per_task=r.cpus_per_task,
                  timeout_min=r.timeout_min)
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb:
        params["mem_gb"] = r.mem_gb
    if cluster != "slurm":
        return params
    params["slurm_signal_delay_s"] = r.signal_delay_s
    for key, value in (("partition", r.partition), ("account", r.account), ("qos", r.qos),
                       ("constraint", r.constraint)):
        if value:
            params[f"slurm_{key}"] = value
    extra = dict(r.slurm_extra)
    if after is not None:
        # A stage whose predecessor failed or was cancelled can never start: Slurm cancels it (and so
        # the rest of the chain) instead of leaving it pending with reason DependencyNeverSatisfied.
        extra.update({"dependency": f"{dependency}:{after}", "kill-on-invalid-dep": "yes"})
    if extra:
        params["slurm_additional_parameters"] = extra
    # One rank that ends abnormally (a crash, a hang) ends the step: the others would wait in collectives.
    params["slurm_srun_args"] = [KILL_ON_BAD_EXIT]
    if r.container is not None:
        params["slurm_srun_args"] += srun_options(spec, os.getcwd())
        params["slurm_setup"] = container_setup(os.path.dirname(_jobs_folder(spec)))
    return params


def executor_for(spec, local: bool = False, after: str | None = None, *, dependency: str = "afterok",
                 folder: str | None = None) -> submitit.AutoExecutor:
    """The executor of ``spec``'s job; ``after``: the Slurm job it waits for (``dependency``), in a chain;
    ``folder``: submitit's (default: in the run dir)."""
    cluster = "local" if local else "slurm"
    in_container = spec.resources.container is not None and cluster == "slurm"
    python = {"slurm_python": shlex.join(wrap(spec, ["python"], os.getcwd()))} if in_container else {}
    executor = submitit.AutoExecutor(folder=folder or _jobs_folder(spec), cluster=cluster,
                                     slurm_max_num_timeout=spec.resources.max_requeues, **python)
    executor.update_parameters(**executor_parameters(spec, cluster, after, dependency))
    return executor


def check_submittable(spec, *, local=False, force_new=False) -> None:
    """What must hold before ``spec`` is submitted; writes nothing."""
    try:
        refuse_control_characters(spec.run_dir)  # it becomes paths in the batch script
    except ValueError as err:
        raise UserError(f"run_dir: {err}") from None
    if spec.resources.container is not None and not local:
        check_container(spec, os.getcwd())
    check_run_dir(spec, force_new)


def submit(spec, *, local=False, dry_run=False, force_new=False, out=None) -> str | None:
    """Submit ``spec``; returns the job id (None for a dry run)."""
    job_ids = submit_chain([Stage(1, spec.run_dir, spec)], local=local, dry_run=dry_run, force_new=force_new, out=out)
    return job_ids[0] if job_ids else None


def slurm_unreachable() -> str | None:
    """Why Slurm cannot take a job from this machine, or None when it can."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH"
    return None


def slurm_for(local: bool, dry_run: bool) -> str | None:
    """Why Slurm cannot be reached (None when it can, or is not needed: --local); a submission without it is
    refused, a dry run goes on."""
    unreachable = None if local else slurm_unreachable()
    if unreachable and not dry_run:
        raise UserError(f"no Slurm reachable from this machine ({unreachable}): load your cluster's Slurm "
                        f"environment (e.g. `module load slurm`), or run the job on this machine on purpose with "
                        f"--local; `--dry-run` shows what would be submitted")
    return unreachable


def destination(spec, cluster: str) -> str:
    """Where ``spec``'s job goes, in one line: the first thing a submission says."""
    r = spec.resources
    ranks = f"{r.nodes} node{'s' if r.nodes > 1 else ''} x {r.ranks_per_node} rank{'s' if r.ranks_per_node > 1 else ''}"
    if cluster != "slurm":
        return f"{spec.name}: here, on this machine (submitit's local executor), {r.world_size} rank(s)"
    return (f"{spec.name}: Slurm, partition {r.partition or '(the cluster default)'}, account "
            f"{r.account or '(your default)'}, {ranks}, {r.gpus_per_node} GPU(s) per node")


def _notes(spec, cluster: str) -> list[str]:
    if cluster == "slurm" and spec.resources.gpus_per_node == 0:
        return [f"note: {spec.name}: resources.gpus_per_node is 0: every rank runs on CPUs (give --gpus-per-node N "
                f"for GPU nodes)"]
    return []


def submit_chain(stages: list[Stage], *, local=False, dry_run=False, force_new=False, out=None) -> list[str]:
    """Submit the stages in order, each after the previous one succeeded (afterok); returns the job ids
    (none for a dry run). Every stage is checked before the first is submitted, and a dry run checks
    all that a submission does: only Slurm's own answer (sbatch --test-only) needs Slurm."""
    out = out or sys.stdout
    chained = len(stages) > 1
    if chained and local:
        raise UserError("a chain of specs needs Slurm (each stage waits for the previous one's success); "
                        "without it, run the specs one after another")
    for stage in stages:
        try:
            check_submittable(stage.spec, local=local, force_new=force_new)
        except UserError as err:
            raise UserError(f"{stage.label}: {err}" if chained else str(err)) from None
    check_chain(stages)
    cluster = "local" if local else "slurm"
    unreachable = slurm_for(local, dry_run)
    for stage in stages:
        print(("would submit " if dry_run else "submitting ") + destination(stage.spec, cluster), file=out)
        for note in _notes(stage.spec, cluster):
            print(note, file=out)
    if dry_run:
        for stage in stages:
            print_dry_run(stage.spec, local, f"<the job id of stage {stage.number - 1}>"
                           if stage.number > 1 else None, out, f"# {stage.label}\n" if chained else "",
                           slurm_reachable=not unreachable)
        if unreachable:
            print(f"note: no Slurm reachable from this machine ({unreachable}): the spec checks passed, "
                  f"Slurm's own (sbatch --test-only) did not run; a submission from here is refused", file=out)
        return []
    if not local:
        for stage in stages:
            test_only(executor_for(stage.spec))  # before any run dir is touched
    job_ids: list[str] = []
    try:
        for stage in stages:
            job_ids.append(submit_one(stage.spec, local, force_new, after=job_ids[-1] if job_ids else None, out=out))
    except UserError as err:
        if job_ids:  # the chain is all or nothing: its first stages would run for nothing
            subprocess.run(["scancel", *job_ids], capture_output=True, timeout=60)
            raise UserError(f"{stages[len(job_ids)].label}: {err}; cancelled the stages submitted before it "
                            f"(jobs {', '.join(job_ids)})") from None
        raise
    if chained:
        record = chain_record(stages, job_ids)
        for position, stage in enumerate(stages, start=1):
            RunDir(stage.spec.run_dir).record(CHAIN_EVENT, stage=position, stages=record)
        print(f"chain of {len(stages)} jobs: {' -> '.join(job_ids)}; follow it with `idiff status "
              f"{stages[-1].spec.run_dir}`", file=out)
    return job_ids


def print_dry_run(spec, local, after, out, heading, slurm_reachable, dependency="afterok", folder=None) -> None:
    cluster = "local" if local else "slurm"
    print(f"{heading}# resolved spec", file=out)
    print(dump_spec(spec), file=out)
    if not (local or slurm_reachable):  # submitit's Slurm executor needs srun even to print its sbatch options
        print(f"# {cluster} parameters, as idiff gives them to submitit", file=out)
        print(yaml.safe_dump(executor_parameters(spec, cluster, after, dependency), sort_keys=True), file=out)
        return
    # submitit makes its log folder when the executor is made: a dry run leaves no folder behind it
    made = [path for path in (spec.run_dir, "slurm-logs") if not storage.is_remote(path) and not os.path.exists(path)]
    executor = executor_for(spec, local, after=after, dependency=dependency, folder=folder)
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
    print(f"# {executor.cluster} parameters", file=out)
    print(yaml.safe_dump(executor._executor.parameters, sort_keys=True), file=out)
    print(f"# each rank runs\n{executor._executor._submitit_command_str}", file=out)


def submit_one(spec, local, force_new, *, after, out, job=None) -> str:
    """Take ``spec``'s run dir and submit ``job`` (default: the spec's own), after the Slurm job ``after``;
    returns its job id."""
    return submit_job(spec, local, force_new, after=after, out=out, job=job).job_id


def submit_job(spec, local, force_new, *, after, out, job=None) -> submitit.Job:
    """submit_one, returning submitit's Job."""
    # Marked as this run's before submitit writes into it (its local executor makes its log folder as soon
    # as it is made), and before the job's own check.
    run_dir = claim_run_dir(spec, force_new)
    executor = executor_for(spec, local, after=after)
    try:
        submitted = executor.submit(job or SubmittedJob(spec.model_dump(mode="json")))
    except Exception as err:  # sbatch's refusal arrives as submitit's FailedJobError with its stderr
        raise UserError(f"the scheduler refused the job: {str(err).strip()}") from None
    run_dir.record("submit", kind=spec.kind, slurm_job_id=submitted.job_id if executor.cluster == "slurm" else None,
                   nodes=spec.resources.nodes, world_size=spec.resources.world_size, after=after)
    print(f"submitted job {submitted.job_id} ({executor.cluster}): {spec.name}", file=out)
    print(f"  run dir: {spec.run_dir}", file=out)
    print(f"  logs:    {submitted.paths.stdout}\n           {submitted.paths.stderr}", file=out)
    return submitted


def test_only(executor) -> None:
    """``sbatch --test-only`` on the script submitit would send: a request that can never be met
    (more nodes than the partition has, ...) is refused now, with Slurm's reason, instead of pending forever."""
    script = executor._executor._make_submission_file_text("true", "test-only")
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as f:
        f.write(script)
        f.flush()
        result = subprocess.run(["sbatch", "--test-only", f.name], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise UserError(f"the scheduler refused the job: {(result.stderr or result.stdout).strip()}")
