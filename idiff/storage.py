"""Files on local disks or blob stores (gs://, az://) through blobfile, written atomically.

Importing this module sets blobfile's retry policy for the whole process (see docs/object-stores.md): a request
that fails is tried again with backoff for at most IDIFF_STORE_RETRY_S seconds, after which the operation raises
StoreUnavailable (exit 75: resumable), and sooner once a stop was asked for (``give_up_retrying_when``).
"""

import binascii
import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import stat
import sys
import threading
import time
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated

import blobfile as bf
import blobfile._common as bf_common
import torch
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

from .errors import RunFailed, UserError

# ----------------------------------------------------------------------------- which paths
SCHEMES = ("gs://", "az://", "https://")  # what blobfile serves (https:// only as an Azure blob URL)


def is_remote(path) -> bool:
    return "://" in str(path)


def unsupported_scheme(path: str) -> str | None:
    """Why ``path`` names a store that idiff cannot reach (s3://, hdfs://, ...), or None."""
    scheme = path.split("://", 1)[0] + "://" if is_remote(path) else None
    if scheme is None or scheme in ("gs://", "az://"):
        return None
    if scheme == "https://" and ".blob.core.windows.net/" in path:
        return None
    return (f"{scheme} paths are not supported: idiff reads and writes local paths, gs://BUCKET/... (Google Cloud "
            f"Storage) and az://ACCOUNT/CONTAINER/... (Azure Blob Storage; also https://ACCOUNT.blob.core.windows.net/"
            f"CONTAINER/...); see docs/object-stores.md")


# ----------------------------------------------------------------------------- the store's retry policy
# blobfile retries a failed request forever by default (connection and TLS errors, timeouts, 408/429/5xx): a store
# that stops answering would hold a run, and its nodes, for as long as it is away. idiff bounds that: the tries of
# one operation end after IDIFF_STORE_RETRY_S seconds, waits between tries grow from 0.1 s to BACKOFF_MAX_S (with
# jitter), and then StoreUnavailable ends the run as resumable. blobfile takes its waits from
# ``_common.exponential_sleep_generator`` at every retry loop (requests, ranged reads, streaming writes), which is
# where the bound and the stop are checked: there is no public setting for either.
RETRY_SECONDS_VARIABLE = "IDIFF_STORE_RETRY_S"
DEFAULT_RETRY_SECONDS = 120.0
BACKOFF_MAX_S = 8.0  # also how late a stop is noticed while the store is away
REQUEST_TIMEOUT_S = 20  # blobfile's connect and read timeout of one request
EXIT_STORE_UNAVAILABLE = 75  # EX_TEMPFAIL, as a preempted run: nothing is lost that the next run cannot redo


class StoreUnavailable(RunFailed):
    """A store did not answer for the whole retry window (or a stop came while it was away)."""

    exit_code = EXIT_STORE_UNAVAILABLE


def retry_seconds() -> float:
    text = os.environ.get(RETRY_SECONDS_VARIABLE, "")
    try:
        seconds = float(text) if text else DEFAULT_RETRY_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise UserError(f"{RETRY_SECONDS_VARIABLE}={text!r}: expected a number of seconds >= 0")
    return seconds


_stop_check: Callable[[], bool] = bool  # the current job's "was a stop asked for?"; bool() is False
_gave_up = threading.Event()  # once one operation gave up, the job is ending: the others try only once
_last_failure = threading.local()  # what the current thread's last failed request was, for the message


def give_up_retrying_when(stop_requested: Callable[[], bool]) -> None:
    """For the job starting now: while a store is away, end its retries (StoreUnavailable) as soon as
    ``stop_requested()`` is true. A SIGTERM then ends the run within about BACKOFF_MAX_S + REQUEST_TIMEOUT_S, not
    when the store is back."""
    global _stop_check
    _stop_check = stop_requested
    _gave_up.clear()


_QUERY = re.compile(r"\?[^\s'\"),>]*")  # a URL's query may hold a SAS token: never quoted


def _failed_request(message: str) -> None:
    """blobfile's log callback, called on each failed try before its wait: remembered for StoreUnavailable."""
    request = re.search(r"method=(\w+) url=(\S+)", message)
    what = f"{request.group(1)} {_store_path(request.group(2))}" if request else \
        message.split(" when executing")[0][:200]
    reason = re.search(r"(unexpected status \d+|Connection refused|timed out|Name or service not known|"
                       r"SSL[A-Za-z]*Error|Connection reset|RemoteDisconnected)", message)
    _last_failure.text = _QUERY.sub("", f"{what} ({reason.group(1) if reason else 'request failed'})")


def _store_path(url: str) -> str:
    """The az:// path of an Azure blob URL (others as they are), for messages: what the user wrote."""
    url = urllib.parse.unquote(_QUERY.sub("", url))
    azure = re.fullmatch(r"https://([^./]+)\.blob\.core\.windows\.net/(.*)", url)
    return f"az://{azure.group(1)}/{azure.group(2)}" if azure else url


def _waits() -> Iterator[float]:
    """blobfile's waits before each try of one operation: bounded in total time, and given up on a stop."""
    started, window = time.monotonic(), retry_seconds()
    _last_failure.text = None
    yield 0.0  # the first retry comes at once: most failures are a dropped connection
    base, tries = 0.1, 1
    while True:
        waited = time.monotonic() - started
        stop = _stop_check()
        if stop or _gave_up.is_set() or waited >= window:
            _gave_up.set()
            why = "a stop was asked for while the store did not answer" if stop else \
                f"the store did not answer for {waited:.0f} s ({tries} tries; {RETRY_SECONDS_VARIABLE}={window:g})"
            raise StoreUnavailable(f"{getattr(_last_failure, 'text', None) or 'a store request'} failed: {why}; "
                                   f"nothing half-written is used: run the same command again once the store "
                                   f"answers, and it resumes from the last complete checkpoint")
        if tries in (1, 4) or tries % 10 == 0:
            print(f"idiff: store: {_last_failure.text} failed; trying again for up to {window - waited:.0f} s",
                  file=sys.stderr, flush=True)
        tries += 1
        yield min(base * random.random() + base / 2, BACKOFF_MAX_S, max(window - waited, 0.0))
        base = min(base * 2, BACKOFF_MAX_S)


bf_common.exponential_sleep_generator = _waits
bf.configure(
    log_callback=_failed_request, retry_log_threshold=0, retry_common_log_threshold=0,
    connect_timeout=REQUEST_TIMEOUT_S, read_timeout=REQUEST_TIMEOUT_S,
    # blobfile would keep an account key, in plain text, in ~/.blobfile/azure_access_tokens.json (and go on
    # using it after the key in the environment changed)
    save_access_token_to_disk=False,
)


def join(*parts) -> str:
    return bf.join(*[str(p) for p in parts])


_reachable: set[str] = set()  # the containers and buckets this process has seen answer


def _store_root(path: str) -> str:
    """The container (az://ACCOUNT/CONTAINER) or bucket (gs://BUCKET) of a store path."""
    scheme, rest = path.split("://", 1)
    parts = rest.split("/")
    return f"{scheme}://" + "/".join(parts[:2] if scheme == "az" else parts[:1])


def _checked(query: Callable[[str], bool]) -> Callable[[str], bool]:
    """``query`` (exists, isdir) that, for a store path, refuses wrong credentials and a missing container or
    bucket as bad input naming the path (exit 2), instead of answering False or failing with a traceback."""

    def checked(path) -> bool:
        path = str(path)
        if not is_remote(path):
            return query(path)
        root = _store_root(path)
        try:
            answer = query(path)
            if root not in _reachable:
                if not answer and not bf.isdir(root):
                    raise UserError(f"{path}: {root} does not exist (or these credentials cannot see it): create "
                                    f"it first (blobfile cannot create containers or buckets)")
                _reachable.add(root)
        except (bf.Error, binascii.Error) as err:  # what retrying cannot mend: no, wrong or malformed credentials
            first_line = _QUERY.sub("", str(err).splitlines()[0])[:300]
            raise UserError(f"{path}: {first_line}; check the credentials in the environment "
                            f"(docs/object-stores.md)") from None
        return answer

    return checked


exists = _checked(bf.exists)
isdir = _checked(bf.isdir)


def check_store(path) -> None:
    """For a store path: a UserError naming it unless the credentials reach its container or bucket, and that
    exists (a job checks its inputs so, before it claims its run dir)."""
    if is_remote(path):
        exists(path)


# ----------------------------------------------------------------------------- links inside run dirs
# A run dir (and every other folder idiff writes a tree into) is registered here by ``confine``. Every local
# path under a registered folder that idiff reads, writes, truncates, renames or deletes through this module is
# checked first: no part of it below that folder may be a symbolic link (exit 2 naming it: the link may lead
# anywhere, and the folder or file it names may be the user's), and a file changed in place (appended to,
# truncated) that has other hard links is first replaced by a private copy, so the other names keep their
# content. The folder itself may be a link: its path is the user's choice. See docs/security.md.
_confined: set[str] = set()


def confine(folder) -> None:
    """Make ``folder`` a tree that idiff reads and writes without following links out of it."""
    if not is_remote(folder):
        _confined.add(os.path.abspath(str(folder)))


def _confining_root(path: str) -> str | None:
    roots = [r for r in _confined if path == r or path.startswith(r.rstrip(os.sep) + os.sep)]
    return max(roots, key=len, default=None)


def refuse_links(path) -> None:
    """A UserError when a part of local ``path`` below its confined folder is a symbolic link."""
    if is_remote(path):
        return
    path = os.path.abspath(str(path))
    root = _confining_root(path)
    if root is None:
        return
    current = root
    for part in os.path.relpath(path, root).split(os.sep):
        if part == ".":
            continue
        current = os.path.join(current, part)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return  # what does not exist yet is made by idiff, as a plain folder or file
        if stat.S_ISLNK(mode):
            raise UserError(f"{current} is a symbolic link inside {root}: idiff neither reads nor writes through "
                            f"links in a run dir (they may lead outside it); remove the link (or replace it by the "
                            f"file or folder itself) and run again")


def _unshare(path: str) -> None:
    """Before changing local file ``path`` in place: when it has other hard links, give it a private copy,
    so that the change does not reach them (they may be outside the run dir)."""
    refuse_links(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        with open(path, "rb") as f:
            data = f.read()
        atomic_write_bytes(path, data)
        print(f"idiff: {path} had {info.st_nlink - 1} other hard link(s); it is now a file of its own, and they "
              f"keep their content", file=sys.stderr, flush=True)


def listdir(path) -> list[str]:
    refuse_links(path)
    return bf.listdir(path)


def read_bytes(path) -> bytes:
    refuse_links(path)
    return bf.read_bytes(path)


def read_text(path) -> str:
    refuse_links(path)
    return bf.read_text(path)


def open_for_reading(path):
    """A binary file object of ``path``. Local files are opened plainly: blobfile gives them an 8 MB read
    buffer, more than a shard of 64x64 samples."""
    refuse_links(path)
    return bf.BlobFile(str(path), "rb") if is_remote(path) else open(path, "rb")


# Packed shards on a store are read one sample at a time, in a random order: each read is one ranged GET of exactly
# the sample (blobfile's 8 MB read buffer would fetch 8 MB for a sample of a few kB), or, with IDIFF_SHARD_CACHE
# naming a local folder, the shard is downloaded there once per machine and read like a local file
# (benchmarks/README.md, "Object stores", has the numbers behind both).
SHARD_CACHE_VARIABLE = "IDIFF_SHARD_CACHE"


def open_for_ranged_reads(path):
    """A binary file object of store ``path`` for reads at random offsets: each read is one request of its size."""
    refuse_links(path)
    return bf.BlobFile(str(path), "rb", buffer_size=1)


def cached_locally(path: str) -> str:
    """``path``; or, for a store path when IDIFF_SHARD_CACHE names a folder, its copy in that folder, downloaded
    first if absent. The copy's name holds the blob's version (etag), so a replaced blob is downloaded again; one
    process of the machine downloads, the others wait for it (a lock file), and an interrupted download leaves no
    copy (written under a temporary name, then renamed)."""
    folder = os.environ.get(SHARD_CACHE_VARIABLE)
    if not folder or not is_remote(path):
        return path
    info = bf.stat(path)
    key = hashlib.sha256(f"{path}\0{info.version or info.size}".encode()).hexdigest()[:32]
    local = os.path.join(folder, f"{key}-{bf.basename(path)}")
    if not os.path.exists(local):
        os.makedirs(folder, exist_ok=True)
        with open(f"{local}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(local):
                with atomic_local_file(local) as copy, bf.BlobFile(path, "rb") as blob:
                    shutil.copyfileobj(blob, copy, 8 << 20)
    return local


def makedirs(path) -> None:
    refuse_links(path)
    bf.makedirs(str(path))


def remove(path) -> None:
    refuse_links(path)
    if bf.exists(path):
        bf.remove(path)


# The temporary name atomic_write_bytes gives a file while it is being written.
TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def unsafe_name_reason(name) -> str | None:
    """Why ``name``, read from inside a file, cannot be a file name in a folder; None when it can."""
    if not isinstance(name, str) or not name:
        return "empty or not a string"
    if name in (".", ".."):
        return "it names a folder, not a file in it"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains a control character"
    return None


def checked_name(name, source: str) -> str:
    """``name`` if it is a plain file name; else a UserError naming ``source`` (the file it came from) and the name."""
    reason = unsafe_name_reason(name)
    if reason is not None:
        raise UserError(f"{source}: {name!r} cannot be used as a file name ({reason})")
    return name


def free_space(path) -> str:
    """The free space of the file system holding ``path`` (or its nearest existing parent), for messages."""
    path = os.path.abspath(str(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown free space"
    return f"{free / 2**20:.1f} MiB free"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def partial_name(name: str) -> str:
    """A hidden name beside ``name`` for its unfinished output, saying which host and process writes it:
    ``.NAME.partial-HOST-PID-XXXXXXXX``. The next run of the command removes it when that process is gone."""
    return f".{name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def remove_stale_partials(folder, name) -> list[str]:
    """Remove the partial outputs for ``name`` in local ``folder`` (``partial_name``) of processes of this host
    that are gone (killed: SIGKILL, or a SIGTERM that ran no cleanup); returns their paths. Those of live
    processes, and of other hosts (whose processes cannot be checked from here), are left alone."""
    pattern = re.compile(re.escape(f".{name}.partial-{socket.gethostname()}-") + r"([0-9]+)-[0-9a-f]{8}", re.ASCII)
    removed = []
    for entry in (os.listdir(folder) if os.path.isdir(folder) else []):
        match = pattern.fullmatch(entry)
        if match and not pid_alive(int(match.group(1))):
            path = os.path.join(folder, entry)
            refuse_links(path)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            print(f"idiff: removed {path}, left by a killed run (process {match.group(1)})", file=sys.stderr)
            removed.append(path)
    return removed


def atomic_write_bytes(path, data: bytes) -> dict:
    """Write ``data`` so that ``path`` holds either nothing new or all of it; returns size and sha256.

    Local: a temporary name in the same folder, fsync, rename, fsync the folder. Blob stores commit
    an object only when its upload finishes, which is already atomic.
    """
    path = str(path)
    refuse_links(path)
    if is_remote(path):
        bf.write_bytes(path, data)
    else:
        with atomic_local_file(path) as f:
            f.write(data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@contextlib.contextmanager
def atomic_local_file(path):
    """A file open for writing that becomes the local ``path`` when the block ends without an error: written
    under a temporary name in the same folder, fsynced, renamed, and the folder fsynced (the rename lasts)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> dict:
    return atomic_write_bytes(path, text.encode())


def move(src, dst) -> None:
    """Rename ``src`` to ``dst`` (replacing it); blob stores copy, then remove."""
    refuse_links(src)
    refuse_links(dst)
    if is_remote(src):
        bf.copy(str(src), str(dst), overwrite=True)
        bf.remove(str(src))
    else:
        os.replace(src, dst)


# Blob stores cannot append, and rewriting a whole log per row costs O(rows) per row, O(rows²) per run. There an
# appended file ``log.jsonl`` is stored in pieces: ``log.jsonl`` itself, then ``log.jsonl.part000001``, ... read
# in number order. An append rewrites only the last piece, and starts a new one once that piece holds PART_SIZE
# characters: each append uploads at most PART_SIZE + the row, whatever the log's length, and a log of N
# characters is about N / PART_SIZE objects. Local files are appended to in place: one piece.
PART_SIZE = 1 << 18
_PART = re.compile(r"\.part([0-9]{6,})", re.ASCII)
_filling: dict[str, tuple[str, str]] = {}  # appended file -> (its last piece, that piece's text), on blob stores


def _pieces(path) -> list[str]:
    """The files that together hold appended file ``path``, in order."""
    path = str(path)
    pieces = [path] if bf.exists(path) else []
    if not is_remote(path):
        return pieces
    folder, name = bf.dirname(path), bf.basename(path)
    if not bf.isdir(folder):
        return pieces
    numbered = []
    for entry in bf.listdir(folder):
        match = _PART.fullmatch(entry[len(name):]) if entry.startswith(name) else None
        if match:
            numbered.append((int(match.group(1)), bf.join(folder, entry)))
    return pieces + [piece for _, piece in sorted(numbered)]


def _part_number(piece: str) -> int:
    """0 for the file itself, n for its ``.partNNNNNN``."""
    match = _PART.search(piece)
    return int(match.group(1)) if match and match.end() == len(piece) else 0


def append_text(path, text: str) -> None:
    """Append to a log file (on a blob store, to its last piece: see PART_SIZE). Two processes must not append to
    the same blob-store file at once (their rewrites of the last piece would race)."""
    path = str(path)
    if not is_remote(path):
        _unshare(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        with open(fd, "a") as f:
            f.write(text)
        return
    if path not in _filling:  # this process's first append: continue the last piece (read once, bounded)
        pieces = _pieces(path)
        last = pieces[-1] if pieces else path
        _filling[path] = (last, bf.read_text(last) if pieces else "")
    piece, written = _filling[path]
    if len(written) >= PART_SIZE:
        piece, written = f"{path}.part{_part_number(piece) + 1:06d}", ""
    written += text
    bf.write_text(piece, written)
    _filling[path] = (piece, written)


def read_appended(path) -> str:
    """The text of a file written by ``append_text`` (all its pieces); empty when absent."""
    return "".join(read_text(piece) for piece in _pieces(path))


def replace_first_line(path, line: str) -> None:
    """Replace the first line (a csv header) of a file written by ``append_text``, rewriting only the piece that
    holds it, in one atomic write: the whole file locally, at most PART_SIZE characters on a blob store."""
    piece = _pieces(path)[0]
    text = read_text(piece)
    end = text.find("\n")
    text = line + (text[end + 1:] if end >= 0 else "")
    atomic_write_text(piece, text)
    if _filling.get(str(path), ("",))[0] == piece:
        _filling[str(path)] = (piece, text)


def read_first_line(path) -> str:
    """The first line of a file written by ``append_text``; empty when absent."""
    for piece in _pieces(path):
        refuse_links(piece)
        with bf.BlobFile(piece, "r") as f:
            line = f.readline()
        if line:
            return line
    return ""


# The shape of a log record: a TypedDict with this config, whose fields use Int64 for integers. Strict: a field
# of the wrong type (a bool or a string for an int, an int too large for a float) makes the record unreadable,
# and other keys are kept as they are.
LOG_RECORD = ConfigDict(strict=True, extra="allow")
Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]


def conforms(shape) -> Callable[[dict], bool]:
    """``read_jsonl``'s ``is_valid`` for records of ``shape`` (a TypedDict configured with LOG_RECORD)."""
    adapter = TypeAdapter(shape)

    def is_valid(record: dict) -> bool:
        try:
            adapter.validate_python(record)
        except ValidationError:
            return False
        return True
    return is_valid


def read_jsonl(path, is_valid) -> list[dict]:
    """The records of a JSON-lines file that ``is_valid`` accepts (see ``conforms``); torn lines, garbage, and
    valid JSON of the wrong shape or types are skipped, with one warning that counts them (a crash can leave
    half a line, and a run dir is untrusted input)."""
    return parse_jsonl(read_appended(path).splitlines(), is_valid, path)


def parse_jsonl(lines, is_valid, path) -> list[dict]:
    """The records among ``lines`` (of the file ``path``) that ``is_valid`` accepts; the others are counted in one
    warning."""
    records, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and is_valid(record):
            records.append(record)
        else:
            bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s)", stacklevel=3)
    return records


def drop_trailing_lines(path, keep) -> None:
    """Remove the lines at the end of a text file (written by ``append_text``) back to the last one that
    ``keep(line)`` accepts. The file is read backwards, so the cost grows with what is removed, not with the
    file. On a blob store the pieces are cut newest first, so an interrupted cut leaves a prefix of the file."""
    if is_remote(path):
        _filling.pop(str(path), None)  # the next append reads the (new) last piece again
        for piece in reversed(_pieces(path)):
            lines = bf.read_text(piece).splitlines(keepends=True)
            kept = len(lines)
            while kept and not keep(lines[kept - 1]):
                kept -= 1
            if not kept:
                bf.remove(piece)
                continue
            if kept < len(lines) or not lines[-1].endswith("\n"):  # a kept torn line: the next append needs a \n
                bf.write_text(piece, "".join(lines[:kept]) + ("" if lines[kept - 1].endswith("\n") else "\n"))
            return
        return
    if not os.path.exists(path):
        return
    _unshare(path)
    with open(os.open(path, os.O_RDWR | os.O_NOFOLLOW), "r+b") as f:
        cut = f.seek(0, os.SEEK_END)  # everything from here on is removed
        buffer, buffer_start = b"", cut  # the bytes [buffer_start, cut)
        while cut > 0:
            newline = buffer.rfind(b"\n", 0, len(buffer) - 1 if buffer.endswith(b"\n") else len(buffer))
            if newline < 0 and buffer_start > 0:
                size = min(1 << 16, buffer_start)
                f.seek(buffer_start - size)
                buffer, buffer_start = f.read(size) + buffer, buffer_start - size
                continue
            line = buffer[newline + 1:]
            if keep(line.decode(errors="replace")):
                if not line.endswith(b"\n"):  # a kept line cut before its end of line: the next append needs one
                    f.seek(cut)
                    f.write(b"\n")
                    cut += 1
                break
            buffer, cut = buffer[:newline + 1], buffer_start + newline + 1
        f.truncate(cut)


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def load_torch(path, map_location="cpu"):
    """Load a torch file as untrusted input: tensors and plain containers only."""
    refuse_links(path)
    with bf.BlobFile(str(path), "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


def file_size(path) -> int:
    refuse_links(path)
    return bf.stat(str(path)).size


def file_digest(path) -> dict:
    sha, size = hashlib.sha256(), 0
    with open_for_reading(path) as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}
