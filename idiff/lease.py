"""One writer per run dir: the lease ``lease.json`` that a job holds while it writes the run dir.

The lease names its holder (host, pid, Slurm job id) and carries a heartbeat that the holder rewrites every
HEARTBEAT_S seconds. It is made by a hard link of a complete file onto the name, which succeeds for one process
only, on local disks and on NFS alike (no ``flock``, which shared filesystems do not all honour across nodes).

A second job finding a live lease is refused (exit 2, naming the holder). A lease is stale, and taken over with a
message, when its holder is a process of this host that is gone, when its Slurm job is no longer queued or
running (``squeue``), when its heartbeat is older than EXPIRES_S, or when it is an earlier run of the same Slurm
job (a requeue). A holder that none of these can judge (a process on another host or in another container, no
Slurm job) is watched: a heartbeat that moves means it lives, one that stays until EXPIRES_S means it is gone,
so that ``docker kill`` and the same ``docker run`` again resume within EXPIRES_S. Blob-store run dirs (gs://,
az://) hold no lease.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

from pydantic import with_config
from typing_extensions import TypedDict

from . import storage
from .errors import UserError

LEASE_NAME = "lease.json"
HEARTBEAT_S = 10.0
# 9 missed heartbeats: the holder is gone. Longer than NFS's attribute caching (60 s at most by default), so that
# a live holder's renewed lease is seen on another node before it would count as stale.
EXPIRES_S = 90.0
WATCH_POLL_S = 1.0
_TAKE_ATTEMPTS = 3


@with_config(storage.LOG_RECORD)
class Holder(TypedDict):
    host: str
    pid: storage.Int64
    slurm_job_id: str | None
    heartbeat: float  # seconds since the epoch
    token: str  # this holding's own id


_is_holder = storage.conforms(Holder)


def this_job() -> str | None:
    """The Slurm job id of this process (an array task's own), None outside Slurm."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_job_active(job_id: str) -> bool | None:
    """Whether Slurm job ``job_id`` is queued or running; None when squeue is absent or does not answer."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode == 0:
        return bool(out.stdout.strip())
    return False if "Invalid job id" in out.stderr else None


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    age = time.time() - holder["heartbeat"]
    return f"process {holder['pid']} on {holder['host']}{job} (heartbeat {age:.0f} s ago)"


def verifiably_alive(holder: dict) -> bool:
    """Whether ``holder`` is known to live: a process of this host, or a Slurm job that squeue lists."""
    if holder["host"] == socket.gethostname():
        return True  # stale_reason has found its process alive
    return bool(holder["slurm_job_id"]) and slurm_job_active(holder["slurm_job_id"]) is True


def watch(path: str, holder: dict) -> str | None:
    """Wait while the lease at ``path`` stays as ``holder`` left it: None once its heartbeat moves (the holder
    lives), the reason once it is older than EXPIRES_S (the holder is gone)."""
    while True:
        age = time.time() - holder["heartbeat"]
        if age > EXPIRES_S:
            return f"its heartbeat stopped {age:.0f} s ago (longer than {EXPIRES_S:.0f} s)"
        time.sleep(min(WATCH_POLL_S, EXPIRES_S - age + 0.01))
        _, now = read(path)
        if now is None or now["token"] != holder["token"] or now["heartbeat"] != holder["heartbeat"]:
            return None


def stale_reason(holder: dict | None) -> str | None:
    """Why the lease of ``holder`` no longer holds; None while its holder may still write."""
    if holder is None:
        return "the lease file is unreadable"
    if holder["slurm_job_id"] and holder["slurm_job_id"] == this_job():
        return "it is an earlier run of this Slurm job (requeued)"
    if holder["host"] == socket.gethostname():  # its process decides, whatever squeue says of its job
        return None if storage.pid_alive(holder["pid"]) else f"process {holder['pid']} on this host is gone"
    if holder["slurm_job_id"] and slurm_job_active(holder["slurm_job_id"]) is False:
        return f"Slurm job {holder['slurm_job_id']} is no longer queued or running"
    if time.time() - holder["heartbeat"] > EXPIRES_S:
        return f"its heartbeat is older than {EXPIRES_S:.0f} s"
    return None


class Lease:
    """This process's hold on a run dir; ``release`` (or the end of the process) gives it up."""

    def __init__(self, run_dir: str, heartbeat_s: float = HEARTBEAT_S):
        self.path = storage.join(run_dir, LEASE_NAME)
        self.run_dir = run_dir
        self.heartbeat_s = heartbeat_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread = None

    def record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": this_job(),
                "heartbeat": time.time(), "token": self.token}

    def take(self) -> "Lease":
        """Hold the lease, taking over a stale one; UserError naming the holder of a live one."""
        for _ in range(_TAKE_ATTEMPTS):
            if self._create():
                self._thread = threading.Thread(target=self._beat_until_released, name="lease-heartbeat",
                                                daemon=True)
                self._thread.start()
                return self
            raw, holder = read(self.path)
            if raw is None:
                continue  # released meanwhile: try again
            reason = stale_reason(holder)
            if reason is None and not verifiably_alive(holder):
                _say_watching(self.path, holder)
                reason = watch(self.path, holder)
                if reason is None:
                    _, holder = read(self.path)
                    if holder is None:
                        continue  # released meanwhile: try again
            if reason is None:
                raise UserError(f"{self.run_dir} is being written by {describe(holder)}, which holds {self.path}: "
                                f"one job at a time writes a run dir (a second would log every step twice); wait "
                                f"for it to end, or stop it (scancel) and run again")
            print(f"idiff: taking over {self.path} from "
                  f"{describe(holder) if holder else 'an unknown holder'}: {reason}", file=sys.stderr, flush=True)
            _remove_if_unchanged(self.path, raw)
        raise UserError(f"{self.path}: could not take the lease ({_TAKE_ATTEMPTS} tries): other jobs are starting "
                        f"in this run dir at the same time")

    def _create(self) -> bool:
        """Link a complete lease file onto the name: only one process can succeed (NFS-safe)."""
        storage.refuse_links(self.path)
        tmp = storage.join(self.run_dir, storage.partial_name(LEASE_NAME))
        storage.atomic_write_text(tmp, json.dumps(self.record()))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def beat(self) -> bool:
        """Renew the heartbeat; False when the lease is no longer this process's (taken over as stale)."""
        _, holder = read(self.path)
        if holder is None or holder["token"] != self.token:
            return False
        storage.atomic_write_text(self.path, json.dumps(self.record()))
        return True

    def _beat_until_released(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.beat():
                print(f"idiff: lost the lease {self.path} (another job took it over as stale); this job should "
                      f"stop writing {self.run_dir}", file=sys.stderr, flush=True)
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _, holder = read(self.path)
        if holder is not None and holder["token"] == self.token:
            storage.remove(self.path)


def read(path) -> tuple[str | None, dict | None]:
    """(the lease file's text, its holder when well formed); (None, None) without a lease."""
    try:
        raw = storage.read_text(path)
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(raw)
    except ValueError:
        return raw, None
    return raw, holder if isinstance(holder, dict) and _is_holder(holder) else None


def holder_of(run_dir, watch_unchecked: bool = False) -> dict | None:
    """The live holder of ``run_dir``'s lease; None when there is none, or it is stale. ``watch_unchecked``: a
    holder that cannot be checked from here is watched (up to EXPIRES_S) instead of counted as live."""
    if storage.is_remote(run_dir):
        return None
    path = storage.join(run_dir, LEASE_NAME)
    raw, holder = read(path)
    if raw is None or stale_reason(holder) is not None:
        return None
    if watch_unchecked and not verifiably_alive(holder):
        _say_watching(path, holder)
        if watch(path, holder) is not None:
            return None
    return holder


def _say_watching(path: str, holder: dict) -> None:
    print(f"idiff: {path} is held by {describe(holder)}, which cannot be checked from here: waiting up to "
          f"{EXPIRES_S - (time.time() - holder['heartbeat']):.0f} s for its heartbeat", file=sys.stderr, flush=True)


def _remove_if_unchanged(path: str, raw: str) -> None:
    """Remove the stale lease whose text is ``raw``; a lease that another process put there meanwhile stays."""
    aside = f"{path}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        if storage.read_text(aside) != raw:  # a fresh lease of another process: put it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        os.remove(aside)


def take_lease(run_dir) -> Lease | None:
    """Hold ``run_dir``'s lease for this job (None for a blob-store run dir)."""
    return None if storage.is_remote(run_dir) else Lease(str(run_dir)).take()
