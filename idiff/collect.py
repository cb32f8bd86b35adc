"""``idiff-collect``: merge sample shards into one .npz in index order, streaming, refusing bad input.

The output holds ``arr_0.npy`` (uint8 [N, H, W, 3]) and, for class-conditional samples, ``arr_1.npy``
(int64 labels), as stored (uncompressed) zip members with version 1.0 .npy headers: what
``numpy.load`` reads, and what evaluators that stream ``arr_0`` straight from the zip member expect.
Every shard's headers are checked before anything is written; then one shard at a time is copied.

Shards are untrusted files: ``shards.py`` says how each is checked.
"""

import argparse
import os
import sys
import tempfile
import zipfile

import blobfile as bf
import numpy as np
from tqdm.auto import tqdm

from . import storage
from .errors import UserError, guarded, report
from .run_dir import RunDir
from .shards import RANGE_MEMBER, Shard, npz_headers, range_problem, read_npz, scan_shards
from .visualize import image_grid

PREVIEW_IMAGES = 64
# A fixed member timestamp makes the output a function of the shards alone: equal inputs, equal bytes.
_MEMBER_TIME = (1980, 1, 1, 0, 0, 0)


def _check_ranges(shards: list[Shard], allow_partial: bool, expected: int | None) -> list[tuple[int, int]]:
    """Refuse empty, reversed or overlapping ranges; the missing ones (up to ``expected`` images, when known)
    are an error unless ``allow_partial``."""
    gaps, cursor, previous = [], 0, None
    for shard in shards:
        if shard.end <= shard.start:
            raise UserError(f"{shard.path}: empty or reversed index range [{shard.start}, {shard.end})")
        if previous is not None and shard.start < previous.end:
            raise UserError(f"overlapping shards: {previous.name} and {shard.name} both hold indices "
                            f"[{shard.start}, {min(shard.end, previous.end)}); remove one of them")
        if shard.start > cursor:
            gaps.append((cursor, shard.start))
        cursor, previous = shard.end, shard
    if expected is not None and cursor < expected:
        gaps.append((cursor, expected))
    if gaps and not allow_partial:
        of = f" of the {expected} that the spec asks for" if expected is not None else ""
        raise UserError(f"missing sample indices {_ranges(gaps)}{of}; let the sample job finish, or run it again "
                        f"to fill them, or pass --partial for an output of the images there are")
    return gaps


def _expected_count(source: str) -> int | None:
    """The ``num_samples`` of the sample job whose run dir ``source`` is; None for a folder of shards."""
    run = RunDir(source)
    if not run.is_owned():
        return None
    job = run.saved_job()
    return job.sample.num_samples if job.kind == "sample" else None


def _ranges(ranges, most=10) -> str:
    listed = ", ".join(f"[{a}, {b})" for a, b in ranges[:most])
    return listed + (f" ... ({len(ranges)} ranges)" if len(ranges) > most else "")


def _check_headers(shards: list[Shard]) -> tuple[tuple[int, int, int], bool]:
    """(H, W, 3) and whether the shards hold labels, all shards agreeing."""
    image_shape = has_labels = first = None
    for shard in shards:
        headers = npz_headers(shard.path)
        images, labels = headers.get("arr_0"), headers.get("arr_1")
        if images is None:
            raise UserError(f"{shard.path}: no arr_0 (images)")
        if images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[-1] != 3:
            raise UserError(f"{shard.path}: images are {images.dtype} {list(images.shape)}, "
                            f"expected uint8 [N, H, W, 3]")
        if images.shape[0] != shard.end - shard.start:
            raise UserError(f"{shard.path}: holds {images.shape[0]} images, its name says {shard.end - shard.start}")
        if image_shape is None:
            image_shape, has_labels, first = images.shape[1:], labels is not None, shard
        elif images.shape[1:] != image_shape:
            raise UserError(f"{shard.path}: images are {list(images.shape[1:])}, but {first.name} holds "
                            f"{list(image_shape)}: shards of different jobs?")
        if (labels is not None) != has_labels:
            raise UserError(f"{shard.path}: {'has labels (arr_1)' if labels is not None else 'has no labels (arr_1)'}"
                            f", unlike {first.name}: shards of different jobs?")
        if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
            raise UserError(f"{shard.path}: labels are {labels.dtype} {list(labels.shape)}, "
                            f"expected one integer per image")
        recorded = headers.get(RANGE_MEMBER)  # absent in shards that other tools (or older idiffs) wrote
        if recorded is not None:
            if recorded.shape != (2,) or recorded.dtype.kind not in "iu":
                raise UserError(f"{shard.path}: {RANGE_MEMBER} is {recorded.dtype} {list(recorded.shape)}, "
                                f"expected [start, end]")
            if problem := range_problem(shard):
                raise UserError(f"{shard.path}: {problem}")
    return image_shape, has_labels


def collect(source, output=None, *, output_dir=None, force=False, allow_partial=False) -> str:
    """Merge the shards under ``source`` (a run dir or its samples/ folder) into one .npz; returns its path.

    The default output is ``samples_NxHxWx3.npz`` in ``output_dir`` (else ``source``), next to a
    ``grid.png`` of the first images; a named output ``x.npz`` gets ``x_grid.png``. Neither file is
    replaced without ``force``.
    """
    source = str(source)
    folder = RunDir(source).samples if storage.isdir(RunDir(source).samples) else source
    shards = scan_shards(folder)
    if not shards:
        raise UserError(f"{folder}: no sample shards (shard-XXXXXXXX-YYYYYYYY.npz)")
    gaps = _check_ranges(shards, allow_partial, _expected_count(source))
    image_shape, has_labels = _check_headers(shards)
    count = sum(s.end - s.start for s in shards)
    if output is None:
        output = RunDir(output_dir or source).collected(count, *image_shape[:2])
        grid = RunDir(bf.dirname(output)).grid
    else:
        output = str(output)
        grid = f"{output.removesuffix('.npz')}_grid.png"
    for path in (output, grid):
        storage.refuse_links(path)
        if storage.exists(path) and not force:
            raise UserError(f"{path} exists; pass --force to replace it")

    remote = storage.is_remote(output)
    folder_out = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(output))
    # Beside the output (one file system, so the rename is atomic), hidden, and with the umask's permissions;
    # what a killed collect of the same output left there is removed first.
    os.makedirs(folder_out, exist_ok=True)
    storage.remove_stale_partials(folder_out, os.path.basename(output))
    tmp = os.path.join(folder_out, storage.partial_name(os.path.basename(output)))
    try:
        with open(tmp, "xb") as f:
            preview = _write_npz(f, shards, count, image_shape, has_labels)
            f.flush()
            os.fsync(f.fileno())
        if remote:
            bf.copy(tmp, output, overwrite=True)  # a blob appears only once its upload is complete
        else:
            os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    image_grid(preview, grid)
    if gaps:
        print(f"idiff-collect: partial output: {count} images, indices {_ranges(gaps)} missing", file=sys.stderr)
    return output


def _write_npz(f, shards, count, image_shape, has_labels):
    """Stream the shards' images into ``f`` as an .npz; returns the first images, for the grid."""
    nbytes = count * int(np.prod(image_shape))
    preview, labels = [], []
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
        with archive.open(_member("arr_0.npy"), "w", force_zip64=nbytes >= zipfile.ZIP64_LIMIT) as member:
            np.lib.format.write_array_header_1_0(member, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                "shape": (count, *image_shape)})
            for shard in tqdm(shards, desc="collect", unit="shard", disable=not sys.stderr.isatty()):
                first_images, shard_labels = _copy_images(shard, member, PREVIEW_IMAGES - sum(map(len, preview)))
                preview.append(first_images)
                if has_labels:
                    labels.append(shard_labels)
        if has_labels:
            with archive.open(_member("arr_1.npy"), "w") as member:
                np.lib.format.write_array(member, np.concatenate(labels), version=(1, 0), allow_pickle=False)
    return np.concatenate(preview)


def _copy_images(shard, member, num_first):
    """Append the shard's images to ``member``; returns copies of its first ``num_first`` images and its labels.

    A function of its own, so that one shard's arrays are freed before the next one is read.
    """
    arrays = read_npz(shard.path, ["arr_0", "arr_1"])
    images = arrays["arr_0"]
    member.write(np.ascontiguousarray(images).reshape(-1).data)
    labels = arrays["arr_1"].astype(np.int64) if "arr_1" in arrays else None
    return images[:max(num_first, 0)].copy(), labels


def _member(name) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_MEMBER_TIME)
    info.external_attr = 0o644 << 16
    return info


@guarded("idiff-collect")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="idiff-collect", description="Merge sample shards into one .npz in index order, with a preview grid "
                                          "beside it (grid.png; NAME_grid.png for -o NAME.npz).")
    parser.add_argument("source", help="a sample run dir, or a folder of shard-*.npz files")
    parser.add_argument("-o", "--output", help="output .npz (default: samples_NxHxWx3.npz in SOURCE)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--partial", "--allow-partial", dest="allow_partial", action="store_true",
                        help="merge the shards there are, even if sample indices are missing; the default output "
                             "name says how many images it holds")
    args = parser.parse_args(argv)
    try:
        path = collect(args.source, args.output, force=args.force, allow_partial=args.allow_partial)
    except UserError as err:
        return report(err, "idiff-collect")
    print(path)
    return 0
