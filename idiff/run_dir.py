"""The run directory: what a job owns and where each output lives. Every file name of a run is here.

| name | written by | what |
|---|---|---|
| ``spec.yaml`` | every job | the job as run; its first line marks the folder as idiff's |
| ``jobs.jsonl`` | every job, idiff-submit | the history: one line per submission, start and end |
| ``slurm/<job id>/`` | idiff-submit | submitit's batch script and each rank's output |
| ``checkpoints/`` | train | ``model``/``ema_<rate>_``/``opt``/``state<step>.pt`` and their manifests |
| ``log.jsonl``, ``progress.csv`` | train | one row per ``log_interval`` |
| ``loss.png``, ``samples_<step>.png`` | train | the loss curve and a preview grid at each save |
| ``tensorboard/`` | train | with ``train.tensorboard`` |
| ``evals/<step>/``, ``evals.jsonl``, ``metrics.png`` | train | evaluations during training |
| ``classes.json`` | train, sample | class names, in label order |
| ``samples/``, ``samples_NxHxWx3.npz``, ``grid.png`` | sample | shards, what idiff-collect merges them into, a grid |
| ``eval/``, ``metrics.json`` | evaluate | NLL parts and terms, and the results |
| ``lease.json`` | every job, while it runs | who writes the run dir now (idiff.lease) |

idiff writes only into a folder that is absent or empty, or that it marked as its own: the first line
of the ``spec.yaml`` it writes when it takes the folder is ``OWNER_MARK``. A folder of the user's own
files, or a ``spec.yaml`` someone else wrote, is never written into.
"""

import datetime
import json
import os
import socket
import sys
from typing import Annotated

from pydantic import Field, with_config
from typing_extensions import Required, TypedDict

from . import lease, storage
from .errors import UserError, brief
from .jobspec.load import SpecError, dump_spec, parse_spec, read_spec_data

SWEEP_FILE = "sweep.json"  # in each stage's run dir of a sweep: its points and the job arrays submitted
CHAIN_EVENT = "chain"  # the jobs.jsonl event that lists a chain's stages (idiff-submit A B C)
OWNER_MARK = "# idiff run dir: written by idiff when it took this folder for the job below\n"
JobId = str | storage.Int64  # a Slurm job id (a number, or ARRAY_TASK text)


@with_config(storage.LOG_RECORD)
class ChainStage(TypedDict):
    """A stage of a ``chain`` event of ``jobs.jsonl`` (launch.chain.chain_record)."""
    stage: storage.Int64
    kind: str
    name: str
    run_dir: Annotated[str, Field(pattern=r"^[^\x00]+$")]  # a path to open: not empty, no NUL
    slurm_job_id: JobId | None


@with_config(storage.LOG_RECORD)
class HistoryEvent(TypedDict, total=False):
    """A line of ``jobs.jsonl``: what its readers use, with the types they expect (other keys are kept)."""
    event: Required[str]
    time: Required[str]
    host: str
    kind: str
    launcher: str | None
    world_size: storage.Int64 | None
    slurm_job_id: JobId | None
    restart_count: storage.Int64 | None
    status: str | None
    signal: str | None
    step: storage.Int64 | None
    slurm_job_ids: Annotated[list[JobId], Field(min_length=1)]
    stages: list[ChainStage]


_is_history_event = storage.conforms(HistoryEvent)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    def __init__(self, path):
        self.path = str(path)
        storage.confine(self.path)  # nothing inside is read or written through a link (storage.refuse_links)
        self.lease = None  # the lease.Lease of the job writing it, in that job (claim_run_dir)

    def __truediv__(self, name) -> str:
        return storage.join(self.path, name)

    # Every job.
    spec_file = property(lambda self: self / "spec.yaml")
    history_file = property(lambda self: self / "jobs.jsonl")
    slurm = property(lambda self: self / "slurm")
    classes_file = property(lambda self: self / "classes.json")
    # Training.
    checkpoints = property(lambda self: self / "checkpoints")
    log_file = property(lambda self: self / "log.jsonl")
    progress_file = property(lambda self: self / "progress.csv")
    loss_plot = property(lambda self: self / "loss.png")
    tensorboard = property(lambda self: self / "tensorboard")
    evals_log = property(lambda self: self / "evals.jsonl")
    evals_plot = property(lambda self: self / "metrics.png")

    def preview(self, step: int) -> str:
        return self / f"samples_{step:06d}.png"

    def evaluation(self, step: int) -> str:
        """The folder of the evaluation of checkpoint ``step`` during training."""
        return storage.join(self / "evals", f"{step:06d}")

    # Sampling.
    samples = property(lambda self: self / "samples")
    grid = property(lambda self: self / "grid.png")

    def collected(self, num: int, height: int, width: int) -> str:
        return self / f"samples_{num}x{height}x{width}x3.npz"

    # Evaluation.
    eval = property(lambda self: self / "eval")
    metrics_file = property(lambda self: self / "metrics.json")
    nll_parts = property(lambda self: storage.join(self.eval, "nll_parts"))
    nll_terms = property(lambda self: storage.join(self.eval, "nll_terms.npz"))
    nll_summary = property(lambda self: storage.join(self.eval, "nll.json"))

    def saved_spec(self) -> dict | None:
        """The mapping in ``spec.yaml`` (None without one), read as any untrusted spec: bounded, safe_load only."""
        return read_spec_data(self.spec_file)[0] if storage.exists(self.spec_file) else None

    def saved_job(self):
        """The job in ``spec.yaml``, validated (None without one); a SpecError names the file."""
        data = self.saved_spec()
        return None if data is None else parse_spec({**data, "run_dir": self.path}, source=self.spec_file)

    def changed_end(self, spec) -> dict:
        """{"train.max_steps": [old, new], ...}: where ``spec`` ends that the saved run did not (an extension)."""
        previous = self.saved_spec() if self.is_owned() else None
        if not previous or previous.get("kind") != spec.kind:
            return {}
        saved, wanted = previous.get(spec.kind) or {}, getattr(spec, spec.kind).model_dump(mode="json")
        ends = spec.RUN_END.get(spec.kind, ())
        return {f"{spec.kind}.{key}": [saved.get(key), wanted[key]] for key in sorted(ends)
                if key in saved and saved.get(key) != wanted[key]}

    def is_owned(self) -> bool:
        """Whether idiff took this folder: its spec.yaml carries the mark idiff writes, or (a run dir made
        before the mark existed) sits beside idiff's own job history."""
        if not storage.exists(self.spec_file):
            return False
        return storage.read_bytes(self.spec_file).startswith(OWNER_MARK.encode()) or storage.exists(self.history_file)

    def contents(self) -> list[str]:
        """What the folder holds (idiff's leftover temporary files and a lease aside); empty when absent."""
        if not storage.isdir(self.path):
            return []
        return sorted(name for name in storage.listdir(self.path)
                      if not storage.TEMPORARY.fullmatch(name) and not name.lstrip(".").startswith(lease.LEASE_NAME))

    def write_spec(self, text: str) -> None:
        storage.atomic_write_text(self.spec_file, OWNER_MARK + text)

    def record(self, event: str, **fields) -> None:
        """Append to the job history."""
        line = json.dumps({"event": event, "time": utc_now(), "host": socket.gethostname(), **fields})
        storage.append_text(self.history_file, line + "\n")

    def history(self) -> list[dict]:
        """The job history; torn or garbage lines are skipped with a warning."""
        return storage.read_jsonl(self.history_file, _is_history_event)


def check_run_dir(spec, force_new: bool = False) -> None:
    """Refuse a run dir that cannot be written, or is neither absent, empty, nor idiff's own run of this
    spec; writes nothing."""
    path = spec.run_dir
    run_dir = RunDir(path)
    if storage.exists(path) and not storage.isdir(path):
        raise SpecError(f"run_dir {path} is a file, not a folder; choose another run_dir")
    if not storage.is_remote(path):
        existing = os.path.abspath(path)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UserError(f"run_dir: {path} cannot be created: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK, effective_ids=True):
            raise UserError(f"run_dir: {path} cannot be written: {existing} is read-only for this user")
    contents = run_dir.contents()
    if not contents:
        return
    if not run_dir.is_owned():
        listed = ", ".join(map(brief, contents[:3])) + (", ..." if len(contents) > 3 else "")
        found = "a spec.yaml that idiff did not write" if "spec.yaml" in contents else listed
        raise SpecError(f"run_dir {run_dir.path} is not empty and not an idiff run dir (it holds {found}); idiff "
                        f"writes only into an empty folder or a run dir it made: choose another run_dir")
    if force_new:
        if storage.is_remote(run_dir.path):
            raise SpecError(f"{run_dir.path}: --force-new cannot move a remote run dir aside; choose another run_dir")
        return
    previous = run_dir.saved_job()
    if spec.run_hash() not in previous.run_hashes():
        exclude = {"resources", "run_dir"}
        changed = _differences(previous.model_dump(mode="json", exclude=exclude),
                               spec.model_dump(mode="json", exclude=exclude))
        raise SpecError(
            f"{run_dir.path} holds a run of another spec (changed: {', '.join(changed[:8])}); resume it with "
            f"the identical spec, choose another run_dir, or pass --force-new to move the old run aside"
        )


def claim_run_dir(spec, force_new: bool = False, hold: bool = False) -> RunDir:
    """Take the run dir for ``spec`` (rank 0, or idiff-submit before the job exists): mark it as this run's,
    moving a previous run aside with ``force_new``. ``hold``: the job that writes it takes its lease
    (``run_dir.lease``); without, nothing may be writing it or be queued to (a submission)."""
    check_run_dir(spec, force_new)
    run_dir = RunDir(spec.run_dir)
    refuse_other_writers(run_dir, waiting_too=not hold)
    if force_new and run_dir.is_owned():
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.rename(run_dir.path, f"{run_dir.path.rstrip('/')}.replaced-{stamp}")
    storage.makedirs(run_dir.path)
    run_dir.lease = lease.take_lease(run_dir.path) if hold else None
    ends = run_dir.changed_end(spec)
    run_dir.write_spec(dump_spec(spec))
    if ends:
        run_dir.record("extend", changed=ends)
        print(f"idiff: {run_dir.path}: the run now ends at "
              f"{', '.join(f'{key}={new} (was {old})' for key, (old, new) in ends.items())}; it continues from its "
              f"newest checkpoint as if it had been asked for this from the start", file=sys.stderr, flush=True)
    return run_dir


def refuse_other_writers(run_dir: RunDir, waiting_too: bool) -> None:
    """UserError (exit 2) naming the job that holds ``run_dir``'s live lease; with ``waiting_too`` also one whose
    Slurm job recorded in jobs.jsonl is still queued or running (it will write the run dir). A job that is to
    write it (not ``waiting_too``) watches a holder it cannot check, as after ``docker kill``: it may be gone."""
    holder = lease.holder_of(run_dir.path, watch_unchecked=not waiting_too)
    if holder is not None:
        raise UserError(f"{run_dir.path} is being written by {lease.describe(holder)}: one job at a time writes a "
                        f"run dir; wait for it to end, or stop it (scancel) first")
    if not waiting_too or not storage.exists(run_dir.history_file):
        return
    jobs = dict.fromkeys(str(e["slurm_job_id"]) for e in run_dir.history()
                         if e["event"] in ("submit", "start") and e.get("slurm_job_id"))
    for job_id in jobs:
        if job_id != lease.this_job() and lease.slurm_job_active(job_id):
            raise UserError(f"{run_dir.path}: its Slurm job {job_id} is still queued or running; a second job would "
                            f"write the same run dir: wait for it to end, or scancel {job_id} first")


def _differences(a, b, prefix="") -> list[str]:
    keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else []
    if not keys:
        return [prefix.rstrip(".")] if a != b else []
    return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]


def is_sweep_dir(path: str) -> bool:
    """Whether ``path`` is the folder of a sweep (its points are run dirs inside it)."""
    return storage.exists(storage.join(path, SWEEP_FILE))


def sweep_record(path: str) -> dict:
    """The ``sweep.json`` of a stage's run dir; UserError naming it when it is unreadable."""
    file = storage.join(path, SWEEP_FILE)
    try:
        record = json.loads(storage.read_text(file))
        assert isinstance(record, dict) and isinstance(record["points"], list)
        assert all(isinstance(p["name"], str) and "/" not in p["name"] and p["name"] not in (".", "..")
                   for p in record["points"])
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{file}: not a readable sweep record") from None
    return record
