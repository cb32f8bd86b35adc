"""The run directory: what a job owns and where each output lives.

``spec.yaml`` (the job as run) · ``checkpoints/`` · ``samples/`` · ``eval/`` · ``log.jsonl`` ·
``progress.csv`` · ``jobs.jsonl`` (one line per start and end of a job: the run's history) · PNGs.
"""

import datetime
import json
import socket

import yaml

from . import storage


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
        path = self / "spec.yaml"
        return yaml.safe_load(storage.read_text(path)) if storage.exists(path) else None

    def record(self, event: str, **fields) -> None:
        """Append to the job history."""
        line = json.dumps({"event": event, "time": utc_now(), "host": socket.gethostname(), **fields})
        storage.append_text(self / "jobs.jsonl", line + "\n")

    def history(self) -> list[dict]:
        path = self / "jobs.jsonl"
        if not storage.exists(path):
            return []
        return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]

