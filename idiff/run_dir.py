"""The run directory: what a job owns and where each output lives.

``spec.yaml`` (the job as run) · ``checkpoints/`` · ``samples/`` · ``eval/`` · ``log.jsonl`` ·
``progress.csv`` · ``jobs.jsonl`` (one line per start and end of a job: the run's history) · PNGs.

idiff writes only into a folder that is absent or empty, or that it marked as its own: the first line
of the ``spec.yaml`` it writes when it takes the folder is ``OWNER_MARK``. A folder of the user's own
files, or a ``spec.yaml`` someone else wrote, is never written into.
"""

import datetime
import json
import socket

from . import storage

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
        from .jobs.io import read_spec_data  # jobs.io imports this module

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
