"""Throughput and peak memory of ``idiff-collect`` on 50,000 64x64 images in shards written to a temporary folder.

    python benchmarks/bench_collect.py [--num-images 50000] [--shard-size 64] [--out benchmarks/results/collect.json]

The merge runs in a fresh child process that reports its peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``, a high-water mark) after its imports and after collecting,
and the peak of what Python and numpy allocated while collecting (tracemalloc, which also counts
memory that stays below the high-water mark the imports left). Both are set against the size of
the output. The shards were just written, so they are read from the page cache: MB/s is the
merge itself, including the output's fsync.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

from idiff.shards import shard_name
from idiff.storage import atomic_write_text

MB = 1e6
CHILD = r"""
import json, resource, sys, time, tracemalloc
from idiff.collect import collect
after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
start = time.perf_counter()
collect(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - start
heap_peak = tracemalloc.get_traced_memory()[1]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "rss_after_imports_kb": after_imports, "rss_peak_kb": peak,
                  "traced_peak_bytes": heap_peak}))
"""

def write_shards(folder: str, num_images: int, shard_size: int, size: int, num_classes: int = 1000) -> int:
    """Shards of varied images and labels, as a sample job leaves them; returns their bytes on disk."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (shard_size + 7, size, size, 3), dtype=np.uint8)
    total = 0
    for start in range(0, num_images, shard_size):
        end = min(start + shard_size, num_images)
        offset = start % 7  # neighbouring shards differ, without drawing 600 MB of random numbers
        path = os.path.join(folder, shard_name(start, end))
        np.savez(path, arr_0=palette[offset:offset + end - start], arr_1=np.arange(start, end) % num_classes)
        total += os.path.getsize(path)
    return total


def measure(num_images: int, shard_size: int, size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-collect-") as tmp:
        shards = os.path.join(tmp, "samples")
        os.makedirs(shards)
        shard_bytes = write_shards(shards, num_images, shard_size, size)
        output = os.path.join(tmp, "out.npz")
        start = time.perf_counter()
        child = subprocess.run([sys.executable, "-c", CHILD, shards, output], capture_output=True, text=True,
                               check=True)
        wall = time.perf_counter() - start
        report = json.loads(child.stdout.strip().splitlines()[-1])
        output_bytes = os.path.getsize(output)
    grown_mb = (report["rss_peak_kb"] - report["rss_after_imports_kb"]) * 1024 / MB
    return {
        "num_images": num_images, "image_size": size, "shard_size": shard_size,
        "num_shards": math.ceil(num_images / shard_size),
        "shards_mb": round(shard_bytes / MB, 1), "output_mb": round(output_bytes / MB, 1),
        "collect_s": round(report["seconds"], 2), "child_wall_s": round(wall, 2),
        "mb_per_s": round(output_bytes / MB / report["seconds"], 1),
        "rss_after_imports_mb": round(report["rss_after_imports_kb"] * 1024 / MB, 1),
        "rss_peak_mb": round(report["rss_peak_kb"] * 1024 / MB, 1),
        "rss_growth_mb": round(grown_mb, 1),
        "rss_growth_vs_output": round(grown_mb * MB / output_bytes, 4),
        "traced_peak_mb": round(report["traced_peak_bytes"] / MB, 2),
        "traced_peak_vs_output": round(report["traced_peak_bytes"] / output_bytes, 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=50_000, help="images in all shards")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard (a rank's part of a batch)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square images, px")
    parser.add_argument("--out", default="benchmarks/results/collect.json", help="JSON results file")
    args = parser.parse_args(argv)

    row = measure(args.num_images, args.shard_size, args.image_size)
    columns = [("images", "num_images"), ("shards", "num_shards"), ("output MB", "output_mb"),
               ("seconds", "collect_s"), ("MB/s", "mb_per_s"), ("RSS imports MB", "rss_after_imports_mb"),
               ("RSS peak MB", "rss_peak_mb"), ("RSS growth MB", "rss_growth_mb"), ("traced peak MB", "traced_peak_mb")]
    print("  ".join(f"{title:>14}" for title, _ in columns))
    print("  ".join(f"{row[key]:>14}" for _, key in columns))
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    atomic_write_text(args.out, json.dumps({"config": vars(args), "machine": machine, "results": [row]},
                                           indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
