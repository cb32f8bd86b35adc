"""``idiff-collect``: merge sample shards into one .npz in index order, streaming, refusing bad input."""

import argparse
import io
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

from . import storage
from .errors import UserError
from .visualize import image_grid

_SHARD = re.compile(r"^shard-(\d{8})-(\d{8})\.npz$")
PREVIEW_IMAGES = 64


@dataclass(frozen=True)
class Shard:
    start: int
    end: int  # exclusive
    path: str


def shard_name(start: int, end: int) -> str:
    return f"shard-{start:08d}-{end:08d}.npz"


def scan_shards(folder) -> list[Shard]:
    if not storage.isdir(folder):
        return []
    shards = [Shard(int(m.group(1)), int(m.group(2)), storage.join(folder, name))
              for name in storage.listdir(folder) if (m := _SHARD.match(name))]
    return sorted(shards, key=lambda s: (s.start, s.end))


def _read_shard(shard: Shard) -> dict:
    try:
        with np.load(io.BytesIO(storage.read_bytes(shard.path))) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # numpy raises several types for a damaged zip
        raise UserError(f"{shard.path}: corrupt shard ({type(err).__name__}: {err})") from None
    images = arrays.get("arr_0")
    if images is None or len(images) != shard.end - shard.start:
        raise UserError(f"{shard.path}: holds {0 if images is None else len(images)} images, "
                        f"its name says {shard.end - shard.start}")
    return arrays


def _check_coverage(shards, allow_partial) -> list[tuple[int, int]]:
    gaps, cursor = [], 0
    for previous, shard in zip([None, *shards], shards):
        if previous is not None and shard.start < previous.end:
            raise UserError(f"overlapping shards: {os.path.basename(previous.path)} and {os.path.basename(shard.path)}")
        if shard.start > cursor:
            gaps.append((cursor, shard.start))
        cursor = shard.end
    if gaps and not allow_partial:
        listed = ", ".join(f"[{a}, {b})" for a, b in gaps[:10])
        raise UserError(f"missing sample indices {listed}{' ...' if len(gaps) > 10 else ''}; "
                        f"run the sample job again to fill them, or pass --allow-partial")
    return gaps


def collect(source, output=None, *, output_dir=None, force=False, allow_partial=False) -> str:
    """Merge the shards under ``source`` (a run dir or its samples/ folder) into one .npz; returns its path."""
    source = str(source)
    folder = storage.join(source, "samples") if storage.isdir(storage.join(source, "samples")) else source
    shards = scan_shards(folder)
    if not shards:
        raise UserError(f"{folder}: no sample shards (shard-XXXXXXXX-YYYYYYYY.npz)")
    gaps = _check_coverage(shards, allow_partial)
    first = _read_shard(shards[0])
    image_shape, has_labels = first["arr_0"].shape[1:], "arr_1" in first
    count = sum(s.end - s.start for s in shards)
    if output is None:
        h, w, c = image_shape
        output = storage.join(output_dir or source, f"samples_{count}x{h}x{w}x{c}.npz")
    if storage.exists(output) and not force:
        raise UserError(f"{output} exists; pass --force to replace it")

    labels, preview = [], []
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=None if storage.is_remote(output) else os.path.dirname(os.path.abspath(output)))
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": (count, *image_shape)}
                np.lib.format.write_array_header_2_0(member, header)
                for i, shard in enumerate(shards):
                    arrays = first if i == 0 else _read_shard(shard)
                    images = arrays["arr_0"]
                    if images.dtype != np.uint8 or images.shape[1:] != image_shape:
                        raise UserError(f"{shard.path}: images are {images.dtype} {list(images.shape[1:])}, "
                                        f"expected uint8 {list(image_shape)} like the first shard")
                    if ("arr_1" in arrays) != has_labels:
                        raise UserError(f"{shard.path}: labels {'missing' if has_labels else 'unexpected'}")
                    member.write(np.ascontiguousarray(images).tobytes())
                    if has_labels:
                        labels.append(arrays["arr_1"].astype(np.int64))
                    if sum(len(p) for p in preview) < PREVIEW_IMAGES:
                        preview.append(images[:PREVIEW_IMAGES])
            if has_labels:
                with archive.open("arr_1.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.concatenate(labels), allow_pickle=False)
        if storage.is_remote(output):
            with open(tmp, "rb") as f:
                storage.atomic_write_bytes(output, f.read())
        else:
            os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    image_grid(np.concatenate(preview)[:PREVIEW_IMAGES], storage.join(os.path.dirname(output) or ".", "grid.png"))
    if gaps:
        print(f"idiff-collect: partial output, {len(gaps)} index ranges missing", file=sys.stderr)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="idiff-collect", description=__doc__.split("\n")[0].strip("`: "))
    parser.add_argument("source", help="a sample run dir, or a folder of shard-*.npz files")
    parser.add_argument("-o", "--output", help="output .npz (default: samples_NxHxWx3.npz in the run dir)")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument("--allow-partial", action="store_true", help="merge even if index ranges are missing")
    args = parser.parse_args(argv)
    try:
        path = collect(args.source, args.output, force=args.force, allow_partial=args.allow_partial)
    except UserError as err:
        print(f"idiff-collect: error: {err}", file=sys.stderr)
        return err.exit_code
    print(path)
    return 0
