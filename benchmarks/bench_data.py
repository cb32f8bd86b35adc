"""The data loader on an image folder and on its packed copy, side by side: images/s per loader worker,
and start-up time and metadata operations of one rank at 10k, 100k and 1M entries.

    python benchmarks/bench_data.py [--out benchmarks/results/data.json] [--files 256] [--batches 12]

Throughput: JPEG sources written to a temporary folder, packed with ``idiff data pack``, then read by
ShardedLoader with one worker (random flips on, classes on) on each. Cases: 64 px from JPEGs of ImageNet's
typical size (about 400x350); 256 px from LSUN-size JPEGs (341x256, standing in for LSUN's webp records),
and from the 256x256 PNGs that ``idiff data lsun`` writes.
Start-up: the folder is N empty files (the listing never opens them); the packed copy is an index of N
entries made directly (its shards are never read at start-up). A million files are not made: the folder's
numbers at 1M are extrapolated linearly from 100k, and marked so. Metadata operations are counted by
wrapping os.scandir / os.listdir / os.stat / os.lstat and each listed entry's stat() for the duration.
"""

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
import unittest.mock

import numpy as np
import torch
from PIL import Image

from idiff.data import ImageDataset, PackedDataset, ShardedLoader, open_images
from idiff.data.pack import FolderSource, pack
from idiff.data.packed import INDEX, Index, names_fingerprint, shard_name
from idiff.storage import atomic_write_bytes, atomic_write_text

THROUGHPUT_CASES = ({"image_size": 64, "source": (400, 350), "format": "JPEG", "what": "ImageNet-size"},
                    {"image_size": 256, "source": (341, 256), "format": "JPEG", "what": "LSUN-size"},
                    {"image_size": 256, "source": (256, 256), "format": "PNG", "what": "idiff data lsun"})
STARTUP_COUNTS = (10_000, 100_000, 1_000_000)
FOLDER_MADE_UP_TO = 100_000  # larger folders are extrapolated


def write_sources(folder: str, count: int, width: int, height: int, fmt: str) -> None:
    """``count`` smooth random photo-like images with a little noise, four classes."""
    rng = np.random.default_rng(width)
    for i in range(count):
        coarse = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        noise = rng.integers(-12, 13, (height, width, 3))
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int64)
        Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"c{i % 4}_{i:05d}.{fmt.lower()}"), quality=90)


def images_per_second(data_dir: str, size: int, batch: int, batches: int) -> float:
    """One loader worker's rate: the main process only collates what that worker hands over."""
    loader = ShardedLoader(open_images(data_dir, size, class_cond=True, random_flip=True), global_batch=batch,
                           num_workers=1)
    stream = iter(loader)
    next(stream)  # start the worker
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * batch / elapsed


def throughput(case: dict, files: int, batch: int, batches: int) -> dict:
    size, (width, height) = case["image_size"], case["source"]
    with tempfile.TemporaryDirectory() as root:
        folder, packed = os.path.join(root, "folder"), os.path.join(root, "packed")
        os.mkdir(folder)
        write_sources(folder, files, width, height, case["format"])
        start = time.perf_counter()
        pack(FolderSource(folder), packed, size, workers=1)
        pack_rate = files / (time.perf_counter() - start)
        # Alternated, best of two each: other load on the machine hits both sides alike.
        rates = {path: [] for path in (folder, packed)}
        for _ in range(2):
            for path, found in rates.items():
                found.append(images_per_second(path, size, batch, batches))
        folder_rate, packed_rate = max(rates[folder]), max(rates[packed])
    return {"image_size": size, "source": f"{width}x{height} {case['format']} ({case['what']})",
            "folder_images_per_s": round(folder_rate, 1), "packed_images_per_s": round(packed_rate, 1),
            "speedup": round(packed_rate / folder_rate, 2), "pack_images_per_s_per_process": round(pack_rate, 1)}


class MetadataCounter:
    """Counts the listings and stats that Python code does while it is entered (a shared filesystem's
    metadata server sees one request for each, or more)."""

    def __init__(self):
        self.listings = self.entries = self.stats = 0

    @property
    def operations(self) -> int:
        return self.listings + self.stats

    @contextlib.contextmanager
    def counting(self):
        real_scandir, real_listdir, real_stat, real_lstat = os.scandir, os.listdir, os.stat, os.lstat
        counter = self

        class Entry:
            def __init__(self, entry):
                self._entry = entry

            def stat(self, **kwargs):
                counter.stats += 1
                return self._entry.stat(**kwargs)

            def __getattr__(self, name):
                return getattr(self._entry, name)

        def scandir(path="."):
            self.listings += 1
            entries = [Entry(entry) for entry in real_scandir(path)]
            self.entries += len(entries)
            return iter(entries)

        def listdir(path="."):
            self.listings += 1
            names = real_listdir(path)
            self.entries += len(names)
            return names

        def stat(*args, **kwargs):
            self.stats += 1
            return real_stat(*args, **kwargs)

        def lstat(*args, **kwargs):
            self.stats += 1
            return real_lstat(*args, **kwargs)

        with unittest.mock.patch.multiple(os, scandir=scandir, listdir=listdir, stat=stat, lstat=lstat):
            yield self


def fake_index(count: int, image_size: int) -> bytes:
    """A consistent index of ``count`` entries, as a pack of that many images would write it."""
    names = "\n".join(f"n{i % 1000:08d}_{i:07d}.JPEG" for i in range(count)).encode()
    per_shard = 10_000
    num_shards = -(-count // per_shard)
    offsets = (np.arange(count) % per_shard) * 2048 + 512
    return Index(image_size=image_size, fingerprint=names_fingerprint(names), names=names,
                 classes=[f"n{c:08d}" for c in range(min(count, 1000))],
                 shards=[shard_name(n) for n in range(num_shards)],
                 shard_sizes=np.full(num_shards, per_shard * 2048 + 10240), shard=np.arange(count) // per_shard,
                 offset=offsets, length=np.full(count, 1024), label=np.arange(count) % 1000,
                 upscaled=np.zeros(count, bool)).to_bytes()


def startup(make, open_dataset) -> tuple[float, MetadataCounter]:
    with tempfile.TemporaryDirectory() as root:
        make(root)
        counter = MetadataCounter()
        start = time.perf_counter()
        with counter.counting():
            dataset = open_dataset(root)
        elapsed = time.perf_counter() - start
        assert len(dataset) > 0
    return elapsed, counter


def startup_rows() -> list[dict]:
    rows = []
    for count in STARTUP_COUNTS:
        row = {"entries": count}
        if count <= FOLDER_MADE_UP_TO:
            def make_folder(root, count=count):
                for i in range(count):
                    os.close(os.open(os.path.join(root, f"n{i % 1000:08d}_{i:07d}.JPEG"), os.O_CREAT | os.O_WRONLY))
            seconds, ops = startup(make_folder, lambda root: ImageDataset(root, 64, class_cond=True))
            row.update(folder_s=round(seconds, 3), folder_metadata_ops=ops.operations, folder_extrapolated=False)
        else:
            made = next(r for r in rows if r["entries"] == FOLDER_MADE_UP_TO)
            scale = count / FOLDER_MADE_UP_TO
            row.update(folder_s=round(made["folder_s"] * scale, 1),
                       folder_metadata_ops=round(made["folder_metadata_ops"] * scale), folder_extrapolated=True)
        seconds, ops = startup(lambda root, count=count: atomic_write_bytes(os.path.join(root, INDEX),
                                                                          fake_index(count, 64)),
                               lambda root: PackedDataset(root, 64, class_cond=True))
        row.update(packed_s=round(seconds, 3), packed_metadata_ops=ops.operations)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/data.json", help="JSON results file")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per loader")
    parser.add_argument("--files", type=int, default=256, help="source files per throughput case")
    args = parser.parse_args(argv)

    reads = [throughput(case, args.files, args.batch, args.batches) for case in THROUGHPUT_CASES]
    print(f"{'size':>5} {'source':>34} {'folder img/s':>13} {'packed img/s':>13} {'speedup':>8} {'pack img/s':>11}")
    for r in reads:
        print(f"{r['image_size']:>5} {r['source']:>34} {r['folder_images_per_s']:>13.1f} "
              f"{r['packed_images_per_s']:>13.1f} {r['speedup']:>7.2f}x {r['pack_images_per_s_per_process']:>11.1f}")
    starts = startup_rows()
    print(f"\n{'entries':>9} {'folder s':>10} {'folder ops':>11} {'packed s':>9} {'packed ops':>11}")
    for r in starts:
        mark = "*" if r["folder_extrapolated"] else " "
        print(f"{r['entries']:>9} {r['folder_s']:>9}{mark} {r['folder_metadata_ops']:>10}{mark} {r['packed_s']:>9} "
              f"{r['packed_metadata_ops']:>11}")
    print("* extrapolated linearly from the largest folder made")
    config = {k: getattr(args, k) for k in ("batch", "batches", "files")}
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    atomic_write_text(args.out, json.dumps({"config": config, "machine": machine, "throughput_per_worker": reads,
                                            "startup_one_rank": starts}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
