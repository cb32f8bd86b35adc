"""``idiff data pack``: write a packed dataset (packed.py's format) from an image folder or another source.

Each image is decoded, resized and cropped once, with the reader's pipeline. Shards hold a fixed
number of samples, so every shard is a task of its own for a worker process, and its contents do
not depend on the number of workers. A shard is written under a temporary name and renamed when
complete; then its record (offsets, lengths, which sources were upscaled) goes to ``WORK``. A
killed pack, run again with the same arguments, keeps the shards that have a record and writes
the others. The index comes last, and ``WORK`` goes: a folder with an index is a finished pack.
"""

import concurrent.futures
import io
import json
import os
import shutil
import tarfile
from typing import NamedTuple

import blobfile as bf
import numpy as np
from PIL import Image
from tqdm import tqdm

from .. import storage
from .packed import FORMAT, HEADER, INDEX, VERSION, Index, names_fingerprint, read_index, sample_key, shard_name
from .reader import DataError, class_prefix, decode, labels_from_prefixes, list_image_files, resize_and_crop

DEFAULT_SHARD_SIZE = 256 * 2**20
WORK = ".idiff-pack"  # the plan and the records of finished shards, while a pack is unfinished
PLAN = "plan.json"


class FolderSource:
    """The images of a folder, as the reader lists, names and decodes them."""

    def __init__(self, src: str):
        self.where = str(src)
        self.names = list_image_files(self.where)
        if not self.names:
            raise DataError(f"no images under {self.where}")

    def image(self, index: int) -> Image.Image:
        return decode(bf.join(self.where, self.names[index]))


class _Job(NamedTuple):
    """What every pack worker needs, handed over once when it starts."""

    source: object  # .names, .where, .image(index) -> PIL image
    labels: np.ndarray | None
    image_size: int
    out: str
    per_shard: int


def samples_per_shard(image_size: int, shard_size: int) -> int:
    """How many samples make a shard of about ``shard_size`` bytes if their pixels were stored raw.

    PNG makes most shards smaller; a count fixed in advance keeps shards independent tasks.
    """
    per_sample = image_size * image_size * 3 + 3 * HEADER  # pixels, the two members' headers, the .cls block
    return max(1, shard_size // per_sample)


def pack(source, out: str, image_size: int, workers: int | None = None,
         shard_size: int = DEFAULT_SHARD_SIZE) -> int:
    """Pack ``source`` into the folder ``out`` at ``image_size`` px; returns the number of samples."""
    if image_size < 1 or shard_size < 1:
        raise DataError(f"--image-size and --shard-size must be positive, got {image_size} and {shard_size}")
    if storage.is_remote(out):
        raise DataError(f"--out {out}: packing writes a local folder; copy it to the bucket afterwards")
    names = source.names
    for name in names:
        for part in name.split("/"):
            storage.checked_name(part, f"source name in {source.where}")
    names_blob = "\n".join(names).encode()
    labels, classes = None, []
    if all(class_prefix(name) for name in names):
        classes, label_list = labels_from_prefixes(names, source.where)
        labels = np.asarray(label_list, np.int32)
    plan = {"format": FORMAT, "version": VERSION, "image_size": image_size, "count": len(names),
            "fingerprint": names_fingerprint(names_blob),
            "samples_per_shard": samples_per_shard(image_size, shard_size)}
    out = os.path.abspath(out)
    if _claim(out, plan, source.where):
        print(f"{out} is already a complete pack of {source.where}")
        return len(names)
    job = _Job(source, labels, image_size, out, plan["samples_per_shard"])
    num_shards = -(-len(names) // job.per_shard)
    todo = [n for n in range(num_shards) if not os.path.exists(_record_path(out, n))]
    _run(job, todo, workers or os.cpu_count() or 1, len(names))
    records = [json.loads(storage.read_text(_record_path(out, n))) for n in range(num_shards)]
    counts = [len(r["offsets"]) for r in records]
    index = Index(image_size=image_size, fingerprint=plan["fingerprint"], names=names_blob, classes=classes,
                  shards=[shard_name(n) for n in range(num_shards)],
                  shard_sizes=np.array([r["size"] for r in records], np.int64),
                  shard=np.repeat(np.arange(num_shards), counts),
                  offset=np.concatenate([r["offsets"] for r in records]),
                  length=np.concatenate([r["lengths"] for r in records]),
                  label=labels if labels is not None else np.full(len(names), -1),
                  upscaled=np.concatenate([r["upscaled"] for r in records]))
    storage.atomic_write_bytes(os.path.join(out, INDEX), index.to_bytes())
    shutil.rmtree(os.path.join(out, WORK))
    return len(names)


def _claim(out: str, plan: dict, where: str) -> bool:
    """Check that ``out`` may take this pack: absent, empty, or a pack of the same plan. True: already complete."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file, not a folder")
    if os.path.exists(os.path.join(out, INDEX)):
        index = read_index(os.path.join(out, INDEX))
        if (index.fingerprint, index.image_size) != (plan["fingerprint"], plan["image_size"]):
            raise DataError(f"--out {out} already holds a packed dataset of other images or at {index.image_size} "
                            f"px: choose another --out or remove it")
        return True
    plan_file = os.path.join(out, WORK, PLAN)
    if os.path.exists(plan_file):
        try:
            saved = json.loads(storage.read_text(plan_file))
        except ValueError as e:
            raise DataError(f"cannot read {plan_file}: {e}") from None
        changed = [key for key, value in plan.items() if not isinstance(saved, dict) or saved.get(key) != value]
        if changed:
            raise DataError(f"--out {out} holds an unfinished pack of other input ({', '.join(changed)} differ from "
                            f"{where} at these options): rerun it with its own source and options, or choose "
                            f"another --out")
        for name in os.listdir(out):  # what a killed pack was writing
            if storage.TEMPORARY.fullmatch(name):
                os.remove(os.path.join(out, name))
        return False
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"--out {out} is not empty and holds no pack that idiff started: choose an empty or new "
                        f"folder")
    storage.atomic_write_text(plan_file, json.dumps(plan, indent=1))
    return False


def _record_path(out: str, number: int) -> str:
    return os.path.join(out, WORK, f"{shard_name(number)}.json")


def _run(job: _Job, todo: list[int], workers: int, total: int) -> None:
    progress = tqdm(total=len(todo), desc=f"packing {total} images", unit="shard")
    if workers == 1 or len(todo) <= 1:
        _start_worker(job)
        for number in todo:
            _write_shard(number)
            progress.update()
    else:
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), initializer=_start_worker,
                                                    initargs=(job,)) as pool:
            futures = [pool.submit(_write_shard, number) for number in todo]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
                    progress.update()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    progress.close()


_job: _Job | None = None  # this worker's job, from _start_worker


def _start_worker(job: _Job) -> None:
    global _job
    _job = job


def _write_shard(number: int) -> None:
    """Write shard ``number`` (temporary name, fsync, rename), then its record."""
    job = _job
    start, end = number * job.per_shard, min((number + 1) * job.per_shard, len(job.source.names))
    record = {"offsets": [], "lengths": [], "upscaled": []}
    with storage.atomic_local_file(os.path.join(job.out, shard_name(number))) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, end):
                image = job.source.image(index)
                png = encode_png(resize_and_crop(image, job.image_size))
                record["offsets"].append(tar.offset + HEADER)
                record["lengths"].append(len(png))
                record["upscaled"].append(min(image.size) < job.image_size)
                _add_member(tar, f"{sample_key(index)}.png", png)
                if job.labels is not None:
                    _add_member(tar, f"{sample_key(index)}.cls", str(int(job.labels[index])).encode())
        record["size"] = f.tell()
    storage.atomic_write_text(_record_path(job.out, number), json.dumps(record))


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A plain file member with fixed metadata: the same inputs give the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))

