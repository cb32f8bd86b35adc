"""Images per second of the data loader at 32, 64 and 256 px, on JPEG files it writes to a temporary folder.

    python benchmarks/bench_data.py [--out benchmarks/results/data.json] [--workers 2] [--batch 32]

Source files are 1.25 x 1.5 times the target size, so that every image is decoded, resized, cropped
(and randomly flipped) as in training.
"""

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from idiff.data import ImageDataset, ShardedLoader
from idiff.storage import atomic_write_text

SIZES = (32, 64, 256)


def write_jpegs(folder: str, count: int, size: int) -> tuple[int, int]:
    """``count`` smooth random JPEGs larger than ``size``; returns their (width, height)."""
    width, height = size * 3 // 2, size * 5 // 4
    rng = np.random.default_rng(size)
    for i in range(count):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.BICUBIC).save(
            os.path.join(folder, f"c{i % 4}_{i:05d}.jpg"), quality=90)
    return width, height


def images_per_second(data_dir: str, size: int, batch: int, workers: int, batches: int) -> float:
    loader = ShardedLoader(ImageDataset(data_dir, size, class_cond=True, random_flip=True), global_batch=batch,
                           num_workers=workers)
    stream = iter(loader)
    for _ in range(max(2, workers)):  # start the workers and fill the prefetch queue
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * batch / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/data.json", help="JSON results file")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per size")
    parser.add_argument("--files", type=int, default=256, help="source files per size")
    args = parser.parse_args(argv)

    rows = []
    for size in SIZES:
        with tempfile.TemporaryDirectory() as folder:
            width, height = write_jpegs(folder, args.files, size)
            rate = images_per_second(folder, size, args.batch, args.workers, args.batches)
        rows.append({"image_size": size, "source": f"{width}x{height} jpeg", "images_per_s": round(rate, 1)})

    print(f"{'size':>6} {'source':>16} {'images/s':>10}")
    for row in rows:
        print(f"{row['image_size']:>6} {row['source']:>16} {row['images_per_s']:>10.1f}")
    config = {k: getattr(args, k) for k in ("workers", "batch", "batches", "files")}
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    atomic_write_text(args.out, json.dumps({"config": config, "machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
