"""The loader: world-size independent batches, epoch orders from (seed, epoch), exact resume, errors."""

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idiff.data import DataError, ImageDataset, ShardedLoader, epoch_order, load_data

NUM_FILES = 10


def write_images(folder, count=NUM_FILES, side=8, start=0):
    folder.mkdir(exist_ok=True)
    for i in range(start, start + count):
        pixels = np.random.default_rng(i).integers(0, 256, (side, side + 3, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % 3}_{i:02d}.png")
    return str(folder)


@pytest.fixture
def data_dir(tmp_path):
    return write_images(tmp_path / "images")


def take(loader, steps):
    batches = [next(loader) for _ in range(steps)]
    loader.close()
    return batches


def run(data_dir, steps, global_batch=4, rank=0, world_size=1, seed=0, num_workers=0, state=None, **dataset_kw):
    ds = ImageDataset(data_dir, 8, seed=seed, **dataset_kw)
    loader = ShardedLoader(ds, global_batch=global_batch, rank=rank, world_size=world_size, seed=seed,
                           num_workers=num_workers)
    if state is not None:
        loader.load_state_dict(state)
    return take(iter(loader), steps), loader


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.indices, b.indices)
        assert torch.equal(a.images, b.images)
        assert (a.labels is None and b.labels is None) or torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_are_disjoint_and_make_the_one_rank_batch(data_dir, world_size):
    steps, global_batch = 6, 8  # 48 images: the stream crosses four epochs of 10 files
    whole, _ = run(data_dir, steps, global_batch, random_flip=True, class_cond=True)
    shards = [run(data_dir, steps, global_batch, rank, world_size, random_flip=True, class_cond=True)[0]
              for rank in range(world_size)]
    for k in range(steps):
        parts = [shard[k] for shard in shards]
        assert torch.equal(whole[k].positions, torch.arange(k * global_batch, (k + 1) * global_batch))
        assert torch.equal(torch.cat([p.positions for p in parts]), whole[k].positions)
        assert torch.equal(torch.cat([p.images for p in parts]), whole[k].images)
        assert torch.equal(torch.cat([p.labels for p in parts]), whole[k].labels)
        assert all(len(p.positions) == global_batch // world_size for p in parts)


def test_each_epoch_is_a_permutation_from_seed_and_epoch(data_dir):
    batches, _ = run(data_dir, 4, global_batch=5, seed=7)
    indices = torch.cat([b.indices for b in batches]).tolist()
    first, second = indices[:NUM_FILES], indices[NUM_FILES:]
    assert sorted(first) == sorted(second) == list(range(NUM_FILES))
    assert first == epoch_order(7, 0, NUM_FILES).tolist() and second == epoch_order(7, 1, NUM_FILES).tolist()
    assert first != second
    assert epoch_order(8, 0, NUM_FILES).tolist() != first
    assert torch.cat([b.indices for b in run(data_dir, 4, global_batch=5, seed=7)[0]]).tolist() == indices


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(data_dir, num_workers):
    uninterrupted, _ = run(data_dir, 7, class_cond=True, random_flip=True, num_workers=num_workers)
    before, stopped = run(data_dir, 3, class_cond=True, random_flip=True, num_workers=num_workers)
    state = stopped.state_dict()
    assert state["position"] == 3 * 4  # batches handed out, not those the workers prefetched
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)
    after, resumed = run(data_dir, 4, class_cond=True, random_flip=True, num_workers=num_workers, state=restored)
    assert_same_batches(before + after, uninterrupted)
    assert resumed.state_dict()["position"] == 7 * 4


def test_resume_on_another_world_size_reads_the_same_global_batches(data_dir):
    uninterrupted, _ = run(data_dir, 5)
    _, stopped = run(data_dir, 2)
    halves = [run(data_dir, 3, rank=r, world_size=2, state=stopped.state_dict())[0] for r in range(2)]
    for k, batch in enumerate(uninterrupted[2:]):
        assert torch.equal(torch.cat([halves[0][k].images, halves[1][k].images]), batch.images)


def test_iterating_leaves_the_global_torch_rng_alone(data_dir):
    rng_state = torch.get_rng_state()
    run(data_dir, 2, num_workers=1)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_labels_follow_the_files_and_batches_live_on_the_device(data_dir):
    (batch,), loader = run(data_dir, 1, class_cond=True)
    assert batch.images.dtype == torch.float32 and batch.images.shape == (4, 3, 8, 8)
    assert batch.images.min() >= -1 and batch.images.max() <= 1
    assert batch.labels.dtype == torch.int64 and batch.labels.device == loader.device
    assert batch.labels.tolist() == [int(loader.dataset.files[i].rsplit("/c", 1)[1][0]) for i in batch.indices]
    assert run(data_dir, 1)[0][0].labels is None


def test_changed_files_or_seed_refuse_the_saved_state(tmp_path, data_dir):
    _, loader = run(data_dir, 1)
    state = loader.state_dict()
    write_images(tmp_path / "images", count=1, start=NUM_FILES)
    with pytest.raises(DataError, match=f"images under {data_dir} changed since the checkpoint"):
        run(data_dir, 1, state=state)
    with pytest.raises(DataError, match="seed changed"):
        run(data_dir, 1, state={**state, "seed": 1, "num_files": 11,
                                "fingerprint": ImageDataset(data_dir, 8).fingerprint})


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_image_message_reaches_the_main_process_whole(data_dir, num_workers):
    bad = f"{data_dir}/c0_bad.png"
    Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError) as info:
        run(data_dir, 3, global_batch=NUM_FILES + 1, num_workers=num_workers)
    assert str(info.value).startswith(f"cannot read image {bad}: ") and "Traceback" not in str(info.value)


def test_small_images_are_counted_as_they_are_read(tmp_path, caplog):
    write_images(tmp_path / "images", count=4)
    data_dir = write_images(tmp_path / "images", count=2, side=5, start=4)
    with caplog.at_level(logging.WARNING):
        batches, loader = run(data_dir, 2, global_batch=3)
    assert loader.num_upscaled == int(sum(b.upscaled.sum() for b in batches)) == 2
    assert "smaller than 8 px" in caplog.text and "2 of 6 images rank 0 read" in caplog.text


def test_load_data_keeps_the_original_interface(data_dir):
    images, cond = next(load_data(data_dir=data_dir, batch_size=3, image_size=8, class_cond=True))
    assert images.shape == (3, 3, 8, 8) and cond["y"].shape == (3,)
    ordered = load_data(data_dir=data_dir, batch_size=4, image_size=8, deterministic=True)
    ds = ImageDataset(data_dir, 8)
    for step in range(3):  # files in order, wrapping around after the tenth
        images, cond = next(ordered)
        expected = np.stack([ds[(4 * step + j) % NUM_FILES].image for j in range(4)])
        assert cond == {} and torch.equal(images, torch.from_numpy(expected))
