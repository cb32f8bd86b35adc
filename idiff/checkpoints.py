"""Checkpoints: the original's file names, written atomically, counted only when their manifest matches.

A checkpoint at step S is ``model{S:06d}.pt``, ``ema_{rate}_{S:06d}.pt`` per rate, ``opt{S:06d}.pt``,
``state{S:06d}.pt`` and, written last, ``checkpoint{S:06d}.json`` with each file's size and sha256.
A crash at any point leaves either the previous complete checkpoint or the new one, never a mix.

A checkpoint folder is untrusted input (a run dir may come from anyone): a manifest may only name
files of its own step in its own folder, or the checkpoint is not used; pruning deletes only the
files whose names it derives from a step number, whatever a manifest says.
"""

import collections
import contextlib
import json
import os
import re
import signal
import threading
import warnings

from . import storage
from .errors import RunFailed

# ASCII digits only, as idiff writes them (``\d`` would also match other scripts' digits, which int() reads).
_MANIFEST = re.compile(r"checkpoint([0-9]{6,})\.json", re.ASCII)
_STEP_FILE = re.compile(r"(?:model|opt|state|ema_[0-9.e-]+_)([0-9]{6,})\.pt", re.ASCII)

# Test hook: "STEP:PREFIX" makes the writer SIGKILL its own process right after writing the file of
# that step starting with PREFIX, i.e. in the middle of a checkpoint, as a node failure would.
KILL_DURING_SAVE_ENV = "IDIFF_TEST_KILL_DURING_SAVE"


def checkpoint_files(step: int, ema_rates) -> dict[str, str]:
    """Role -> file name of the checkpoint at ``step``."""
    files = {"model": f"model{step:06d}.pt", "opt": f"opt{step:06d}.pt", "state": f"state{step:06d}.pt"}
    files.update({f"ema_{rate}": f"ema_{rate}_{step:06d}.pt" for rate in ema_rates})
    return files


def manifest_name(step: int) -> str:
    return f"checkpoint{step:06d}.json"


def step_of(filename: str) -> int | None:
    """The step in a checkpoint file name such as model012000.pt or ema_0.9999_012000.pt; None unless the name
    is exactly the one idiff gives that step (``model0000012.pt`` is not step 12's)."""
    name = os.path.basename(filename)
    match = _STEP_FILE.fullmatch(name) or _MANIFEST.fullmatch(name)
    return int(match.group(1)) if match and match.group(1) == f"{int(match.group(1)):06d}" else None


class CheckpointStore:
    def __init__(self, folder):
        self.folder = str(folder)
        self._verified = set()  # steps whose every file this process wrote or hashed against the manifest
        self._warned = set()  # manifest names already warned about

    def path(self, name) -> str:
        return storage.join(self.folder, name)

    def manifest_path(self, step) -> str:
        return self.path(manifest_name(step))

    def write(self, step: int, payloads: dict, meta: dict) -> None:
        """Write each ``{file name: object}`` atomically, then the manifest that makes them count.

        A failed write (a full disk, a quota) removes this step's files again and raises RunFailed: the
        previous complete checkpoint stays the newest, and the folder holds no half checkpoint.
        """
        try:
            storage.makedirs(self.folder)
            files = {}
            for name, obj in payloads.items():
                files[name] = storage.atomic_write_bytes(self.path(name), storage.torch_bytes(obj))
                _maybe_die(step, name)
            manifest = {"step": step, "files": files, **meta}
            storage.atomic_write_text(self.manifest_path(step), json.dumps(manifest, indent=1))
            self._verified.add(step)
        except OSError as err:
            for name in [*payloads, manifest_name(step)]:
                with contextlib.suppress(OSError):
                    storage.remove(self.path(name))
            with contextlib.suppress(OSError):
                self.remove_stale_temporaries()
            previous = self.latest_complete()
            kept = f"checkpoint {previous} is the newest complete one" if previous is not None else "none is complete"
            raise RunFailed(f"could not write checkpoint {step} to {self.folder} ({err.strerror or err}; "
                            f"{storage.free_space(self.folder)}): its partial files were removed and {kept}. "
                            f"Free some space and run the job again: it resumes from there") from None

    def steps(self) -> list[int]:
        """Steps that have a manifest (complete or not), ascending. A file named like a manifest but not exactly
        as idiff names one (other digits than ASCII ones, a step with extra leading zeros) is not a step: it is
        ignored, with one warning naming it."""
        if not storage.isdir(self.folder):
            return []
        steps = []
        for name in storage.listdir(self.folder):
            step = step_of(name) if name.endswith(".json") else None
            if step is not None:
                steps.append(step)
            elif name.startswith("checkpoint") and name.endswith(".json"):
                self._warn_once(name, "its name is not checkpoint<step>.json with the step in ASCII digits")
        return sorted(steps)

    def _warn_once(self, name: str, why: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            warnings.warn(f"ignoring {self.path(name)}: {why}", stacklevel=3)

    def manifest(self, step: int) -> dict:
        return json.loads(storage.read_text(self.manifest_path(step)))

    def problem(self, step: int, hashes: bool = True) -> str | None:
        """Why the checkpoint at ``step`` cannot be used, or None when every file matches its manifest.

        ``hashes=False`` compares sizes only, which reads no file (``idiff status`` on a run of many checkpoints).

        Only files of this step in this folder are looked at: a manifest naming anything else (``../x``,
        an absolute path, another step's file) makes the checkpoint unusable, and nothing it names is read.
        """
        try:
            manifest = self.manifest(step)
        except (OSError, ValueError) as err:
            return f"unreadable manifest ({err})"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or type(manifest.get("step")) is not int or manifest["step"] != step:
            return "not a checkpoint manifest of this step"
        foreign = next((name for name in files if storage.unsafe_name_reason(name) or not _STEP_FILE.fullmatch(name)
                        or step_of(name) != step), None)
        if foreign is not None:
            return f"its manifest names {foreign!r}, which is not a file of checkpoint {step} in {self.folder}"
        missing = [name for name in checkpoint_files(step, ()).values() if name not in files]
        if missing:
            return f"its manifest does not list {', '.join(missing)}"
        for name, expected in files.items():
            path = self.path(name)
            if not storage.exists(path):
                return f"{name} is missing"
            if not storage.is_remote(path) and os.path.islink(path):
                return f"{name} is a symbolic link, which may point outside {self.folder}"
            if not hashes:
                if not isinstance(expected, dict) or storage.file_size(path) != expected.get("size"):
                    return f"{name} does not have the size its manifest gives (truncated or corrupt)"
            elif storage.file_digest(path) != expected:
                return f"{name} does not match its manifest (truncated or corrupt)"
        if hashes:
            self._verified.add(step)
        return None

    def verified_steps(self) -> list[int]:
        """The steps of complete checkpoints whose files match their manifests, ascending. Each is hashed once
        per process (one this process wrote is known to match; later only its manifest and sizes are checked
        again); an unusable one is left out, warned about once."""
        verified = []
        for step in self.steps():
            problem = self.problem(step, hashes=step not in self._verified)
            if problem is None:
                verified.append(step)
            else:
                self._warn_once(manifest_name(step), f"not a usable checkpoint ({problem})")
        return verified

    def latest_complete(self) -> int | None:
        """The newest usable checkpoint; incomplete or corrupt ones are skipped with a warning naming them."""
        for step in reversed(self.steps()):
            problem = self.problem(step)
            if problem is None:
                return step
            warnings.warn(f"skipping checkpoint {self.manifest_path(step)}: {problem}", stacklevel=2)
        return None

    def load(self, name: str):
        return storage.load_torch(self.path(name))

    def remove_stale_temporaries(self) -> None:
        """Temporary files of writes that a crash interrupted."""
        if storage.is_remote(self.folder) or not os.path.isdir(self.folder):
            return
        for name in storage.listdir(self.folder):
            if name.startswith(".") and name.endswith(".tmp"):
                storage.remove(self.path(name))

    def prune(self, keep_last: int | None, keep_every: int | None) -> list[int]:
        """Delete old checkpoints: all but the newest ``keep_last`` complete, verified ones, except multiples of
        ``keep_every``.

        Only evidence counts: a checkpoint is kept or doomed by its verified step, and an unusable manifest
        (a partial copy, ``checkpoint999999.json``) neither counts as one of the newest nor is deleted. The
        files deleted are the ones of this folder whose names are exactly idiff's for a doomed step (model,
        opt, state, ema_*), so no manifest can make pruning delete anything else.
        """
        if not keep_last:
            return []
        steps = self.verified_steps()
        doomed = [s for s in steps[:-keep_last] if not (keep_every and s % keep_every == 0)]
        if not doomed:
            return []
        names = list(storage.listdir(self.folder))
        for step in doomed:
            storage.remove(self.manifest_path(step))  # first, so a half-pruned checkpoint never counts
            self._verified.discard(step)
            for name in names:
                if _STEP_FILE.fullmatch(name) and step_of(name) == step:
                    storage.remove(self.path(name))
        return doomed


def _maybe_die(step, name):
    target = os.environ.get(KILL_DURING_SAVE_ENV)
    if target:
        target_step, prefix = target.split(":", 1)
        if int(target_step) == step and name.startswith(prefix):
            os.kill(os.getpid(), signal.SIGKILL)


class BackgroundWriter:
    """Writes one checkpoint at a time on a thread, so that training does not wait on storage."""

    def __init__(self, store: CheckpointStore):
        self.store = store
        self._thread = None
        self._error = None
        self._complete = collections.deque()  # steps whose manifest is written, not yet handed out by completed()

    def submit(self, step, payloads, meta, after=None) -> None:
        """Write checkpoint ``step``, then run ``after`` (pruning) on the same thread."""
        self.wait()

        def run():
            try:
                self.store.write(step, payloads, meta)
                self._complete.append(step)
                if after is not None:
                    after()
            except BaseException as err:  # re-raised in the training thread by wait()
                self._error = err

        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def completed(self) -> list[int]:
        """Steps whose checkpoints became complete (manifest written) since the last call; never blocks."""
        return [self._complete.popleft() for _ in range(len(self._complete))]  # deque: appends and pops are atomic
