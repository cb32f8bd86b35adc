"""Run dirs and datasets on an object store (az://, on the Azurite emulator of objectstore/azurite.sh): the same
weights, files and refusals as on a local disk, a store that goes away ends the run resumable in bounded time,
and the account key appears nowhere."""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import blobfile as bf
import numpy as np
import pytest
from conftest import (
    AZURITE,
    assert_same_tensors,
    idiff,
    idiff_in_process,
    require_service,
    start_idiff,
    tiny_spec,
    write_spec,
)

from idiff import storage
from idiff.data import ShardedLoader, open_images
from idiff.data.pack import FolderSource, pack

# Processes, real training and Inception: minutes on 2 cores, so `make test-all` (and CI) runs them.
pytestmark = pytest.mark.slow

STEPS, SAVE = 12, 4
FINAL = [f"model{STEPS:06d}.pt", f"opt{STEPS:06d}.pt", f"ema_0.9_{STEPS:06d}.pt", f"ema_0.99_{STEPS:06d}.pt"]


def upload(local: str, remote: str) -> str:
    """Copy a local folder tree to the store (serially: blobfile's parallel upload fails with an account key)."""
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            bf.copy(path, bf.join(remote, os.path.relpath(path, local)))
    return remote


def blobs(prefix: str) -> dict[str, bytes]:
    """Every blob under ``prefix``: relative name -> content."""
    return {bf.join(folder, name)[len(prefix) + 1:]: bf.read_bytes(bf.join(folder, name))
            for folder, _, names in bf.walk(prefix) for name in names}


def logged_step(run_dir: str) -> int:
    rows = [line for line in storage.read_appended(bf.join(run_dir, "log.jsonl")).splitlines() if line.strip()]
    try:
        return int(json.loads(rows[-1])["step"]) if rows else 0
    except ValueError:
        return 0


def wait_for_step(run_dir: str, step: int, proc, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while logged_step(run_dir) < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{run_dir} never reached step {step}"
        time.sleep(0.3)


def final_weights(run_dir: str) -> dict:
    return {name: storage.load_torch(storage.join(run_dir, "checkpoints", name)) for name in FINAL}


@pytest.fixture(scope="module")
def local_run(shapes_dir, tmp_path_factory):
    """The uninterrupted run on a local disk that every store run must end equal to."""
    root = tmp_path_factory.mktemp("local")
    idiff_in_process("train", write_spec(root / "spec.yaml", tiny_spec(shapes_dir, root / "run", max_steps=STEPS,
                                                                       save_interval=SAVE)))
    return {"run": str(root / "run"), "weights": final_weights(str(root / "run"))}


def store_spec(tmp_path, data_dir, run_dir, **train) -> str:
    return write_spec(tmp_path / "spec.yaml", tiny_spec(data_dir, run_dir, **{"max_steps": STEPS,
                                                                               "save_interval": SAVE, **train}))


def key_free(texts) -> None:
    key = os.environ["AZURE_STORAGE_KEY"].encode()
    for where, text in texts:
        assert key not in (text if isinstance(text, bytes) else text.encode()), where


@pytest.mark.objectstore
@pytest.mark.slow
def test_run_on_the_store_stopped_and_resumed_ends_as_the_local_run(store_root, shapes_dir, local_run, tmp_path):
    data, run = upload(shapes_dir, f"{store_root}/shapes"), f"{store_root}/runs/tiny"
    spec = store_spec(tmp_path, data, run)
    proc = start_idiff("train", spec)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stopped = proc.communicate(timeout=120)
    assert proc.returncode == 75, stopped[-3000:]
    assert logged_step(run) < STEPS
    resumed = idiff("train", spec)
    assert_same_tensors(final_weights(run), local_run["weights"])

    status = idiff("status", run)
    assert f"last complete checkpoint: step {STEPS}" in status.stdout
    sample_spec = write_spec(tmp_path / "sample.yaml", {
        "kind": "sample", "name": "draw", "run_dir": f"{store_root}/runs/draw",
        "sample": {"from_run": run, "num_samples": 4, "batch_size": 2, "use_ddim": True,
                   "timestep_respacing": "ddim5"}})
    sampled = idiff("sample", sample_spec)
    with bf.BlobFile(f"{store_root}/runs/draw/samples_4x16x16x3.npz", "rb") as f, np.load(f) as npz:
        assert npz["arr_0"].shape == (4, 16, 16, 3)

    # The key given through the environment: in no blob of either run dir, and in nothing printed.
    key_free([(name, content) for name, content in blobs(f"{store_root}/runs").items()])
    key_free([("stop", stopped), *(("output", r.stdout + r.stderr) for r in (resumed, status, sampled))])


@pytest.mark.objectstore
@pytest.mark.slow
def test_killed_during_an_upload_the_run_resumes_from_the_previous_checkpoint(store_root, shapes_dir, local_run,
                                                                            tmp_path):
    data, run = upload(shapes_dir, f"{store_root}/shapes"), f"{store_root}/runs/killed"
    spec = store_spec(tmp_path, data, run)
    killed = idiff("train", spec, check=False, env={"IDIFF_TEST_KILL_DURING_SAVE": f"{2 * SAVE}:opt"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = f"{run}/checkpoints"
    assert bf.exists(f"{folder}/opt{2 * SAVE:06d}.pt") and not bf.exists(f"{folder}/checkpoint{2 * SAVE:06d}.json")
    resumed = idiff("train", spec)
    assert f"start at step {SAVE}" in resumed.stderr
    assert_same_tensors(final_weights(run), local_run["weights"])


@pytest.mark.objectstore
@pytest.mark.slow
def test_keep_last_deletes_exactly_the_pruned_blobs(store_root, shapes_dir, tmp_path):
    local, run = tmp_path / "local", f"{store_root}/runs/kept"
    for run_dir in (run, local):
        idiff_in_process("train", store_spec(tmp_path, shapes_dir, run_dir, max_steps=8, save_interval=2,
                                             keep_last=1))
    on_store = set(blobs(run))
    on_disk = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert {n for n in on_store if n.startswith("checkpoints/")} == \
        {f"checkpoints/{n}" for n in ("checkpoint000008.json", "model000008.pt", "opt000008.pt", "state000008.pt",
                                      "ema_0.9_000008.pt", "ema_0.99_000008.pt")}
    assert on_store == on_disk  # nothing else deleted, nothing left behind, the same files as on a disk


@pytest.mark.objectstore
def test_packed_data_on_the_store_gives_the_local_batches(store_root, shapes_dir, tmp_path, monkeypatch):
    packed = str(tmp_path / "packed")
    pack(FolderSource(shapes_dir), packed, 16, workers=1)
    remote = upload(packed, f"{store_root}/packed")
    cache = tmp_path / "cache"

    def first_batches(data_dir):
        loader = ShardedLoader(open_images(data_dir, 16, class_cond=True, random_flip=True, seed=3),
                               global_batch=6, rank=0, world_size=1, seed=3, num_workers=1)
        got = [next(loader) for _ in range(3)]
        loader.close()
        return got

    local = first_batches(packed)
    assert_same_tensors(first_batches(remote), local)  # ranged reads from the store
    assert not cache.exists()
    monkeypatch.setenv(storage.SHARD_CACHE_VARIABLE, str(cache))
    assert_same_tensors(first_batches(remote), local)  # through the local shard cache
    shards = [n for n in os.listdir(packed) if n.endswith(".tar")]
    copies = [p for p in cache.iterdir() if p.name.endswith(".tar")]
    assert sorted(p.name.split("-", 1)[1] for p in copies) == sorted(shards)
    assert all(p.read_bytes() == Path(packed, p.name.split("-", 1)[1]).read_bytes() for p in copies)

    bf.write_bytes(f"{remote}/{shards[0]}", Path(packed, shards[0]).read_bytes())  # replaced (a new etag) ...
    assert storage.cached_locally(f"{remote}/{shards[0]}") not in {str(p) for p in copies}  # ... downloaded again


def emulator(action: str) -> None:
    subprocess.run(["bash", str(AZURITE / "azurite.sh"), action], check=True, capture_output=True, timeout=120)


def controllable_emulator() -> None:
    """The fault tests end and restart the emulator: they need root and the emulator of azurite.sh."""
    controllable = os.geteuid() == 0 and subprocess.run(["bash", str(AZURITE / "azurite.sh"), "status"],
                                                        capture_output=True).returncode == 0
    require_service(None if controllable else
                    "ending and restarting the emulator needs root and the emulator of objectstore/azurite.sh")


def start_with_the_store(store_root, shapes_dir, tmp_path, name: str, retry_s: int, **train):
    """A training run on the store, with IDIFF_STORE_RETRY_S=``retry_s``: (spec path, run dir, process)."""
    controllable_emulator()
    data, run = upload(shapes_dir, f"{store_root}/shapes"), f"{store_root}/runs/{name}"
    spec = store_spec(tmp_path, data, run, **train)
    return spec, run, start_idiff("train", spec, env={storage.RETRY_SECONDS_VARIABLE: str(retry_s)})


@contextlib.contextmanager
def store_away(run, proc):
    """The emulator ended once ``run`` logged step 2, and started again (with its blobs) when the block ends."""
    wait_for_step(run, 2, proc)
    emulator("pause")
    try:
        yield time.monotonic()
    finally:
        emulator("start")


@pytest.mark.objectstore
@pytest.mark.slow
def test_a_store_away_longer_than_the_retry_window_ends_the_run_resumable(store_root, shapes_dir, local_run,
                                                                          tmp_path):
    spec, run, proc = start_with_the_store(store_root, shapes_dir, tmp_path, "away", retry_s=3)
    with store_away(run, proc) as away:
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - away
    assert proc.returncode == 75, err[-3000:]
    assert waited < 3 + storage.BACKOFF_MAX_S + storage.REQUEST_TIMEOUT_S + 10, waited
    assert f"{store_root}/" in err and "the store did not answer for" in err and "Traceback" not in err
    idiff("train", spec)  # back: it resumes from its last complete checkpoint, to the uninterrupted run's weights
    assert_same_tensors(final_weights(run), local_run["weights"])


@pytest.mark.objectstore
@pytest.mark.slow
def test_a_store_away_within_the_retry_window_changes_nothing(store_root, shapes_dir, local_run, tmp_path):
    _, run, proc = start_with_the_store(store_root, shapes_dir, tmp_path, "back", retry_s=120)
    with store_away(run, proc):
        time.sleep(5)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "failed; trying again for up to" in err  # it did meet the store away
    assert_same_tensors(final_weights(run), local_run["weights"])


@pytest.mark.objectstore
@pytest.mark.slow
def test_a_stop_is_honoured_while_the_store_is_away(store_root, shapes_dir, tmp_path):
    _, run, proc = start_with_the_store(store_root, shapes_dir, tmp_path, "stopped", retry_s=600, max_steps=400)
    with store_away(run, proc):
        time.sleep(2)  # the run meets the store away ...
        proc.send_signal(signal.SIGTERM)  # ... and is stopped: it ends long before the 600 s of retries
        stopped = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - stopped
    assert proc.returncode == 75, err[-3000:]
    assert took < storage.BACKOFF_MAX_S + storage.REQUEST_TIMEOUT_S + 10, took
    assert "a stop was asked for while the store did not answer" in err


@pytest.mark.objectstore
def test_wrong_key_and_missing_container_exit_2_before_the_run_dir_is_claimed(store_root, shapes_dir, tmp_path):
    run = f"{store_root}/runs/refused"
    spec = store_spec(tmp_path, shapes_dir, run)
    wrong_key = "V3JvbmdLZXk" * 8 + "=="
    refused = idiff("train", spec, check=False, env={"AZURE_STORAGE_KEY": wrong_key})
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert run in refused.stderr and "credentials" in refused.stderr and "Traceback" not in refused.stderr
    assert wrong_key not in refused.stderr + refused.stdout
    assert blobs(store_root) == {}

    data, local_run_dir = upload(shapes_dir, f"{store_root}/shapes"), tmp_path / "local-run"
    for key in (wrong_key, "not base64!"):  # the data on the store: refused alike, before the run dir exists
        refused = idiff("train", store_spec(tmp_path, data, local_run_dir), check=False,
                        env={"AZURE_STORAGE_KEY": key})
        assert refused.returncode == 2 and data in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr and not local_run_dir.exists()

    missing = f"{store_root}-missing/runs/refused"
    refused = idiff("train", store_spec(tmp_path, shapes_dir, missing), check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"{store_root}-missing does not exist" in refused.stderr and "Traceback" not in refused.stderr


def test_paths_blobfile_cannot_serve_are_refused_at_validation(shapes_dir, tmp_path):
    result = idiff_in_process("validate", write_spec(tmp_path / "s3.yaml", tiny_spec("s3://bucket/shapes",
                                                                                      tmp_path / "run")), check=False)
    assert result.returncode == 2
    assert "s3:// paths are not supported" in result.stderr and "az://ACCOUNT/CONTAINER" in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_retry_window_is_checked(monkeypatch):
    monkeypatch.setenv(storage.RETRY_SECONDS_VARIABLE, "soon")
    with pytest.raises(storage.UserError, match=f"{storage.RETRY_SECONDS_VARIABLE}='soon'"):
        storage.retry_seconds()
    monkeypatch.setenv(storage.RETRY_SECONDS_VARIABLE, "2.5")
    assert storage.retry_seconds() == 2.5
