"""The cost of an object store (az://, on the Azurite emulator), side by side with a local disk: requests per
training step and per checkpoint, checkpoint save and load time per GB, images/s per loader worker from packed data.

    sudo bash objectstore/azurite.sh start && eval "$(bash objectstore/azurite.sh env)"
    python benchmarks/bench_store.py [--out benchmarks/results/store.json] [--checkpoint-mb 256]

Requests: every HTTP request blobfile sends is counted (urllib3's PoolManager.urlopen, wrapped here) during two
tiny training runs in this process (no loader worker, so that data reads are counted too) of 10 and 30 steps,
data and run dir on the store, a checkpoint every 10 steps and a log row every 10 steps; the difference of the two
runs is 20 steps and 2 checkpoints, the rest is start-up. Checkpoint: a state dict of float32 tensors written with
storage.atomic_write_bytes and read with storage.load_torch, median of 3. Loader: bench_data's case of 64 px
images from ImageNet-size JPEGs, packed, read by one worker from the local copy and from the store.
The emulator runs on this machine: its numbers leave out the network (latency, bandwidth) of a real store and
count what idiff asks of it.
"""

import argparse
import collections
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import unittest.mock
import uuid

import torch
import urllib3
import yaml

from benchmarks.bench_data import images_per_second, write_sources
from idiff import storage
from idiff.cli import main as idiff_main
from idiff.data.pack import FolderSource, pack
from idiff.data.prepare import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "objectstore"))
from containers import container_request  # noqa: E402  (objectstore/ is scripts, not a package)


@contextlib.contextmanager
def counted_requests():
    """Counter of (category, method) of every request blobfile sends meanwhile."""
    counts = collections.Counter()
    original = urllib3.PoolManager.urlopen

    def urlopen(self, method, url, *args, **kwargs):
        path = (urllib3.util.parse_url(url).path or "").replace("%2F", "/")
        kind = "data" if "/shapes/" in path else "checkpoint" if "/checkpoints/" in path else "run dir"
        counts[kind, method] += 1
        return original(self, method, url, *args, **kwargs)

    with unittest.mock.patch.object(urllib3.PoolManager, "urlopen", urlopen):
        yield counts


def upload(local: str, remote: str) -> None:
    for folder, _, names in os.walk(local):
        for name in names:
            path = os.path.join(folder, name)
            storage.bf.copy(path, storage.join(remote, os.path.relpath(path, local)))  # serial: see the docs


def train_requests(store: str, tmp: str) -> dict:
    synthetic(os.path.join(tmp, "shapes"), n=64, image_size=16, classes=2, seed=0)
    upload(os.path.join(tmp, "shapes"), f"{store}/shapes")
    runs = {}
    for steps in (10, 30):
        spec = {"kind": "train", "name": f"s{steps}", "run_dir": f"{store}/runs/s{steps}",
                "model": {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "attention_resolutions": "8",
                          "channel_mult": "1,2", "learn_sigma": True},
                "diffusion": {"diffusion_steps": 50, "noise_schedule": "cosine"},
                "train": {"data_dir": f"{store}/shapes", "batch_size": 8, "max_steps": steps, "save_interval": 10,
                          "log_interval": 10, "num_workers": 0, "sample_grid": 0, "ema_rate": "0.9999"}}
        path = os.path.join(tmp, f"s{steps}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(spec, f)
        with counted_requests() as counts:
            assert idiff_main(["train", path]) == 0
        runs[steps] = counts
    short, long = runs[10], runs[30]

    def added(kind: str) -> int:  # what 20 more steps and 2 more checkpoints asked of the store
        return sum(n for (k, _), n in long.items() if k == kind) - sum(n for (k, _), n in short.items() if k == kind)

    per_step = {"data": added("data") / 20, "run dir": added("run dir") / 20}
    per_checkpoint = added("checkpoint") / 2
    return {"per_step": per_step, "per_checkpoint": per_checkpoint,
            "start_up": sum(short.values()) - 10 * sum(per_step.values()) - per_checkpoint,
            "by_kind_and_method_30_steps": {f"{k} {m}": n for (k, m), n in sorted(long.items())}}


def checkpoint_times(store: str, tmp: str, megabytes: int) -> dict:
    state = {f"w{i}": torch.randn(megabytes * 2**20 // 4 // 8) for i in range(8)}
    data = storage.torch_bytes(state)
    gigabytes = len(data) / 2**30
    out = {}
    for where, folder in (("local", tmp), ("store", store)):
        saves, loads = [], []
        for i in range(3):
            path = storage.join(folder, f"model{i}.pt")
            start = time.perf_counter()
            storage.atomic_write_bytes(path, data)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            storage.load_torch(path)
            loads.append(time.perf_counter() - start)
            storage.remove(path)
        out[where] = {"save_s_per_gb": statistics.median(saves) / gigabytes,
                      "load_s_per_gb": statistics.median(loads) / gigabytes}
    return {"size_mb": len(data) / 2**20, **out}


def loader_rates(store: str, tmp: str, files: int, batches: int) -> dict:
    """One worker's images/s from the packed copy: local, on the store (one ranged GET per sample; and, for
    comparison, through blobfile's default 8 MB read buffer), and on the store through IDIFF_SHARD_CACHE."""
    sources, packed = os.path.join(tmp, "jpegs"), os.path.join(tmp, "packed")
    os.makedirs(sources)
    write_sources(sources, files, 400, 350, "JPEG")
    pack(FolderSource(sources), packed, 64, workers=2)
    remote = f"{store}/packed"
    upload(packed, remote)
    rate = functools.partial(images_per_second, size=64, batch=16, batches=batches)
    results = {"shard_mb": max(os.path.getsize(os.path.join(packed, n)) for n in os.listdir(packed)) / 2**20,
               "local": rate(packed), "store": rate(remote)}
    buffered = functools.partial(storage.bf.BlobFile, mode="rb")  # what idiff did before: an 8 MB read-ahead
    with unittest.mock.patch.object(storage, "open_for_ranged_reads", lambda path: buffered(str(path))):
        results["store_8mb_buffer"] = rate(remote)
    with unittest.mock.patch.dict(os.environ, {storage.SHARD_CACHE_VARIABLE: os.path.join(tmp, "cache")}):
        start = time.perf_counter()
        for name in os.listdir(packed):
            storage.cached_locally(f"{remote}/{name}")
        results["cache_fill_s"] = time.perf_counter() - start
        results["store_shard_cache"] = rate(remote)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "store.json"))
    parser.add_argument("--checkpoint-mb", type=int, default=256)
    parser.add_argument("--files", type=int, default=2048)  # a shard larger than 8 MB
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    account, key = os.environ.get("AZURE_STORAGE_ACCOUNT"), os.environ.get("AZURE_STORAGE_KEY")
    if not account or not key:
        sys.exit("set AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY (eval \"$(bash objectstore/azurite.sh env)\")")
    container = f"bench-{uuid.uuid4().hex[:8]}"
    assert container_request(account, key, container, "PUT") == 201
    store = f"az://{account}/{container}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {
                "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "requests": train_requests(store, tmp),
                "checkpoint": checkpoint_times(store, tmp, args.checkpoint_mb),
                "loader_images_per_s_one_worker": loader_rates(store, tmp, args.files, args.batches),
            }
    finally:
        container_request(account, key, container, "DELETE")
    print(json.dumps(results, indent=1))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
