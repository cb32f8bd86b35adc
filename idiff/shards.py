"""Sample shards: ``shard-START-END.npz`` files holding the arrays of sample indices [START, END).

Sample jobs and NLL evaluations write them, a requeued job draws only the ranges that no complete shard
covers, and ``idiff-collect`` merges them. Shards are untrusted files: an array is read only after its
.npy header was checked against the bytes the archive holds for it (a header cannot make idiff allocate
more than the file can contain), and a shard written by idiff records its index range (``index_range``),
so that one copied under another range's name is refused instead of counted twice.
"""

import io
import math
import os
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from . import storage
from .errors import UserError
from .ranks.env import RankEnv
from .ranks.signals import any_rank

_SHARD = re.compile(r"shard-([0-9]{8})-([0-9]{8})\.npz", re.ASCII)
RANGE_MEMBER = "index_range"  # [start, end) of the indices a shard holds, written with its arrays
# Deflate cannot expand data more than about 1032-fold: a zip member claiming more is lying about its size.
MAX_DEFLATE_RATIO = 1032


@dataclass(frozen=True)
class Shard:
    start: int
    end: int  # exclusive
    path: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:08d}-{end:08d}.npz"


def scan_shards(folder) -> list[Shard]:
    if not storage.isdir(folder):
        return []
    shards = [Shard(int(m.group(1)), int(m.group(2)), storage.join(folder, name))
              for name in storage.listdir(folder) if (m := _SHARD.fullmatch(name))]
    return sorted(shards, key=lambda s: (s.start, s.end))


def _unreadable(path, err) -> UserError:
    return UserError(f"{path}: not a readable .npz, corrupt or truncated ({type(err).__name__}: {err})")


def read_npz(path, names=None) -> dict[str, np.ndarray]:
    """The arrays of an .npz (only ``names``, when given); a damaged file is a UserError naming it.

    Every header is checked first (``npz_headers``), so what is allocated is what the file holds.
    """
    npz_headers(path)
    try:
        with storage.open_for_reading(str(path)) as f:
            data = np.load(f)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array (.npy), not an .npz archive")
            with data:
                return {name: data[name] for name in data.files if names is None or name in names}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from None


def npz_headers(path) -> dict[str, ArrayHeader]:
    """Shape and dtype of each array in an .npz, from the .npy headers alone (no data is read).

    A header whose shape needs more bytes than its zip member holds, or a member claiming more bytes than
    the archive could expand to, is a UserError: reading it would allocate what the header claims.
    """
    headers = {}
    try:
        with storage.open_for_reading(str(path)) as f:
            archive_size = f.seek(0, os.SEEK_END)
            with zipfile.ZipFile(f) as archive:
                for info in archive.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    name = info.filename.removesuffix(".npy")
                    _check_member_size(path, info, archive_size)
                    with archive.open(info) as npy:
                        version = np.lib.format.read_magic(npy)
                        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                            else np.lib.format.read_array_header_2_0
                        shape, _, dtype = read_header(npy)
                        held = info.file_size - npy.tell()
                    if dtype.hasobject:
                        raise UserError(f"{path}: {name} holds Python objects, not numbers")
                    declared = math.prod(shape) * dtype.itemsize
                    if declared != held:
                        raise UserError(f"{path}: {name}'s header declares {dtype} {list(shape)} ({declared} bytes), "
                                        f"but the file holds {held} bytes for it")
                    headers[name] = ArrayHeader(tuple(shape), dtype)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from None
    return headers


def _check_member_size(path, info: zipfile.ZipInfo, archive_size: int) -> None:
    stored = info.compress_type == zipfile.ZIP_STORED
    possible = info.compress_size if stored else MAX_DEFLATE_RATIO * info.compress_size + (1 << 10)
    if info.compress_size > archive_size or info.file_size > possible:
        raise UserError(f"{path}: member {info.filename} claims {info.file_size} bytes, more than the "
                        f"{archive_size}-byte archive can hold")


def write_shard(folder, start: int, end: int, arrays: dict[str, np.ndarray]) -> None:
    """``arrays`` and the index range they hold, as ``shard-START-END.npz`` in ``folder``, written atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{RANGE_MEMBER: np.array([start, end], dtype=np.int64)})
    storage.atomic_write_bytes(storage.join(folder, shard_name(start, end)), buffer.getvalue())


def shard_problem(shard: Shard, expected: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why ``shard`` does not count as done for a job that writes ``expected`` ({array: (shape, dtype)}):
    unreadable, corrupt, other arrays, or another index range inside than its name says; None when it counts.

    The headers are compared with ``expected`` before any array is read; then all of it is read, which
    checks every member's CRC.
    """
    expected = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in expected.items()}
    expected[RANGE_MEMBER] = ((2,), np.dtype(np.int64))
    try:
        found = {name: (header.shape, header.dtype) for name, header in npz_headers(shard.path).items()}
        if found != expected:
            return f"holds {_layout(found)}, expected {_layout(expected)}"
        read_npz(shard.path)
        return range_problem(shard)
    except UserError as err:
        return str(err)


def _layout(arrays) -> str:
    return ", ".join(f"{name} {dtype} {list(shape)}" for name, (shape, dtype) in sorted(arrays.items())) or "no arrays"


def range_problem(shard: Shard) -> str | None:
    """Whether the index range recorded inside ``shard`` (its header already checked) is the one its name says."""
    start, end = (int(v) for v in read_npz(shard.path, [RANGE_MEMBER])[RANGE_MEMBER])
    if (start, end) != (shard.start, shard.end):
        return (f"holds indices [{start}, {end}), but its name says [{shard.start}, {shard.end}): "
                f"copied under another name?")
    return None


def rank_ranges(num_samples: int, global_batch: int, rank: int, world_size: int):
    """This rank's contiguous part of each global batch: [(start, end), ...]."""
    ranges = []
    for batch_start in range(0, num_samples, global_batch):
        batch_end = min(batch_start + global_batch, num_samples)
        bounds = np.linspace(batch_start, batch_end, world_size + 1).round().astype(int)
        if bounds[rank + 1] > bounds[rank]:
            ranges.append((int(bounds[rank]), int(bounds[rank + 1])))
    return ranges


def missing_parts(start: int, end: int, covered: list[tuple[int, int]]):
    """Sub-ranges of [start, end) that no covered range includes."""
    parts, cursor = [], start
    for a, b in sorted(covered):
        if b <= cursor or a >= end:
            continue
        if a > cursor:
            parts.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < end:
        parts.append((cursor, end))
    return parts


def complete_ranges(folder, arrays_of, env: RankEnv) -> list[tuple[int, int]]:
    """Index ranges of the shards in ``folder`` that hold what ``arrays_of(start, end)`` says a shard of the
    job holds ({array: (shape, dtype)}), decided by rank 0 for all ranks. A shard that does not count
    (corrupt, of another job, copied under another range's name) is moved aside as ``NAME.rejected``,
    so that its range is drawn again."""
    ranges = None
    if env.is_main:
        ranges = []
        for shard in scan_shards(folder):
            problem = shard_problem(shard, arrays_of(shard.start, shard.end))
            if problem is None:
                ranges.append((shard.start, shard.end))
                continue
            storage.move(shard.path, f"{shard.path}.rejected")
            print(f"idiff: {shard.path} does not count ({problem}); moved aside to {shard.name}.rejected, its "
                  f"indices are drawn again", file=sys.stderr, flush=True)
    if env.world_size > 1:
        box = [ranges]
        dist.broadcast_object_list(box, src=0)
        ranges = box[0]
    return ranges


def finish_sharded_job(env, hooks, merge: Callable[[], None]) -> str:
    """The end of a sharded job (sampling, NLL) on every rank: "preempted" when any rank was asked to stop (its
    complete shards are kept for the rerun); else every rank waits for the others and rank 0 ``merge``s."""
    hooks.waiting_for_others()  # its own shards are done: the others' watchdogs watch theirs
    if any_rank(hooks.should_suspend()):
        return "preempted"
    if env.world_size > 1:
        dist.barrier()
    if env.is_main:
        merge()
    return "completed"
