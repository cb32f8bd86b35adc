"""The run directory: what a job owns and where each output lives.

``spec.yaml`` (the job as run) · ``checkpoints/`` · ``samples/`` · ``eval/`` · ``log.jsonl`` ·
``progress.csv`` · ``jobs.jsonl`` (one line per start and end of a job: the run's history) · PNGs.

idiff writes only into a folder that is absent or empty, or that it marked as its own: the first line
of the ``spec.yaml`` it writes when it takes the folder is ``OWNER_MARK``. A folder of the user's own
files, or a ``spec.yaml`` someone else wrote, is never written into.
"""

import datetime
import json
import os
import socket

from . import storage
from .errors import UserError, brief
from .spec.load import SpecError, dump_spec, parse_spec, read_spec_data

OWNER_MARK = "# idiff run dir: written by idiff when it took this folder for the job below\n"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    def __init__(self, path):
        self.path = str(path)

    def __truediv__(self, name) -> str:
        return storage.join(self.path, name)

    @property
    def checkpoints(self) -> str:
        return self / "checkpoints"

    @property
    def samples(self) -> str:
        return self / "samples"

    @property
    def eval(self) -> str:
        return self / "eval"

    def saved_spec(self) -> dict | None:
        """The mapping in ``spec.yaml`` (None without one), read as any untrusted spec: bounded, safe_load only."""
        path = self / "spec.yaml"
        return read_spec_data(path)[0] if storage.exists(path) else None

    def is_owned(self) -> bool:
        """Whether idiff took this folder: its spec.yaml carries the mark idiff writes, or (a run dir made
        before the mark existed) sits beside idiff's own job history."""
        path = self / "spec.yaml"
        if not storage.exists(path):
            return False
        return storage.read_bytes(path).startswith(OWNER_MARK.encode()) or storage.exists(self / "jobs.jsonl")

    def contents(self) -> list[str]:
        """What the folder holds (idiff's leftover temporary files aside); empty when absent."""
        if not storage.isdir(self.path):
            return []
        return sorted(name for name in storage.listdir(self.path) if not storage.TEMPORARY.fullmatch(name))

    def write_spec(self, text: str) -> None:
        storage.atomic_write_text(self / "spec.yaml", OWNER_MARK + text)

    def record(self, event: str, **fields) -> None:
        """Append to the job history."""
        line = json.dumps({"event": event, "time": utc_now(), "host": socket.gethostname(), **fields})
        storage.append_text(self / "jobs.jsonl", line + "\n")

    def history(self) -> list[dict]:
        """The job history; torn or garbage lines are skipped with a warning."""
        return storage.read_jsonl(self / "jobs.jsonl",
                                  lambda e: isinstance(e.get("event"), str) and isinstance(e.get("time"), str))


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
    previous = parse_spec({**run_dir.saved_spec(), "run_dir": run_dir.path}, source=run_dir / "spec.yaml")
    if previous.run_hash() != spec.run_hash():
        exclude = {"resources", "run_dir"}
        changed = _differences(previous.model_dump(mode="json", exclude=exclude),
                               spec.model_dump(mode="json", exclude=exclude))
        raise SpecError(
            f"{run_dir.path} holds a run of another spec (changed: {', '.join(changed[:8])}); resume it with "
            f"the identical spec, choose another run_dir, or pass --force-new to move the old run aside"
        )


def claim_run_dir(spec, force_new: bool = False) -> RunDir:
    """Take the run dir for ``spec`` (rank 0, or idiff-submit before the job exists): mark it as this run's,
    moving a previous run aside with ``force_new``."""
    check_run_dir(spec, force_new)
    run_dir = RunDir(spec.run_dir)
    if force_new and run_dir.is_owned():
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.rename(run_dir.path, f"{run_dir.path.rstrip('/')}.replaced-{stamp}")
    storage.makedirs(run_dir.path)
    run_dir.write_spec(dump_spec(spec))
    return run_dir


def _differences(a, b, prefix="") -> list[str]:
    keys = sorted(set(a) | set(b)) if isinstance(a, dict) and isinstance(b, dict) else []
    if not keys:
        return [prefix.rstrip(".")] if a != b else []
    return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
