"""Packed data: the same examples, batches and weights as the folder it was packed from; resumable packing;
damaged shards and indexes refused naming the file."""

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_tensors, final_files, idiff_in_process, tiny_spec, write_spec
from PIL import Image
from test_data_prepare import LSUN_VALUES, cifar_batches, cifar_tarball, encoded, lsun_lmdb, synsets  # noqa: F401
from test_data_prepare import idiff as prepare_cli

from idiff.data import DataError, ImageDataset, PackedDataset, ShardedLoader, open_images
from idiff.data.pack import WORK, FolderSource, pack
from idiff.data.packed import INDEX, read_index
from idiff.errors import UserError
from idiff.fidelity.images import find_images, load_images

SIZE = 12


def jpeg(path, width, height, seed, mode="RGB"):
    coarse = np.random.default_rng(seed).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGB":
        image.save(path, quality=85)
    else:
        image.convert(mode).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Sources of every kind the reader handles: large (BOX halving), small (upscaled), palette, grayscale,
    RGBA, in a subfolder; labelled by prefix."""
    root = tmp_path_factory.mktemp("packed") / "src"
    for i in range(22):
        width, height = [(50, 41), (13, 17), (9, 8), (30, 24)][i % 4]
        jpeg(root / f"c{i % 3}_{i:03d}.jpg", width, height, i)
    jpeg(root / "sub" / "c1_pal.png", 20, 15, 100, mode="P")
    jpeg(root / "sub" / "c0_gray.png", 16, 26, 101, mode="L")
    jpeg(root / "sub" / "c2_rgba.png", 14, 14, 102, mode="RGBA")
    return str(root)


def packed_copy(src, out, size=SIZE, **kw):
    kw.setdefault("shard_size", 6000)  # three samples per shard at 12 px
    pack(FolderSource(src), str(out), size, **kw)
    return str(out)


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    return packed_copy(folder, tmp_path_factory.mktemp("out") / "packed", workers=2)


def test_packed_copy_reads_exactly_as_its_folder(folder, packed):
    want = ImageDataset(folder, SIZE, class_cond=True)
    got = PackedDataset(packed, SIZE, class_cond=True)
    assert len(got) == len(want) == 25 and got.fingerprint == want.fingerprint and got.classes == want.classes
    assert got.num_upscaled == 5  # the 9x8 sources
    for i in range(len(want)):
        a, b = got[i], want[i]
        assert np.array_equal(a.image, b.image) and a.image.dtype == b.image.dtype
        assert (a.label, a.upscaled) == (b.label, b.upscaled)
    assert got.files == [os.path.relpath(f, folder) for f in want.files]


def test_shards_are_plain_tars_and_the_index_plain_numpy(packed, folder):
    with np.load(os.path.join(packed, INDEX), allow_pickle=False) as index:
        shards, labels = list(index["shards"]), index["label"]
    assert len(shards) > 2
    members = []
    for name in shards:
        with tarfile.open(os.path.join(packed, name)) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    assert [name for name, _ in members[:4]] == ["000000000.png", "000000000.cls", "000000001.png", "000000001.cls"]
    assert [int(data) for name, data in members if name.endswith(".cls")] == labels.tolist()
    png = next(data for name, data in members if name == "000000003.png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), PackedDataset(packed, SIZE).pixels(3))
    assert not os.path.exists(os.path.join(packed, WORK))


def batches(dataset, steps, rank=0, world_size=1, num_workers=0, state=None):
    loader = ShardedLoader(dataset, global_batch=6, rank=rank, world_size=world_size, seed=3, num_workers=num_workers)
    if state is not None:
        loader.load_state_dict(state)
    got = [next(loader) for _ in range(steps)]
    loader.close()
    return got, loader.state_dict()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_gives_the_folders_batches_on_any_world_size(folder, packed, num_workers):
    kw = {"class_cond": True, "random_flip": True, "seed": 3}
    want, _ = batches(ImageDataset(folder, SIZE, **kw), 6)
    got, _ = batches(open_images(packed, SIZE, **kw), 6, num_workers=num_workers)
    halves = [batches(open_images(packed, SIZE, **kw), 6, rank, 2)[0] for rank in range(2)]
    for a, b, r0, r1 in zip(got, want, *halves):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.upscaled, b.upscaled)
        assert torch.equal(torch.cat([r0.images, r1.images]), a.images)


def test_a_run_resumes_across_the_folder_and_its_packed_copy(folder, packed, tmp_path):
    _, state = batches(ImageDataset(folder, SIZE, random_flip=True, seed=3), 2)
    resumed, _ = batches(PackedDataset(packed, SIZE, random_flip=True, seed=3), 2, state=state)
    straight, _ = batches(ImageDataset(folder, SIZE, random_flip=True, seed=3), 4)
    for a, b in zip(resumed, straight[2:]):
        assert torch.equal(a.images, b.images) and torch.equal(a.positions, b.positions)
    with pytest.raises(DataError, match=f"packed at {SIZE} px, but 16 px"):
        open_images(packed, 16)


@pytest.mark.slow
def test_training_on_a_packed_copy_gives_the_same_weights(shapes_dir, tmp_path):
    packed_shapes = packed_copy(shapes_dir, tmp_path / "shapes", size=16, workers=1)
    for name, data in (("folder", shapes_dir), ("packed", packed_shapes)):
        spec = tiny_spec(data, tmp_path / name, max_steps=3, save_interval=3, random_flip=True)
        idiff_in_process("train", write_spec(tmp_path / f"{name}.yaml", spec))
    assert_same_tensors(final_files(tmp_path / "packed", 3), final_files(tmp_path / "folder", 3))


def test_a_killed_pack_continues_with_the_finished_shards(folder, packed, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in sorted(os.listdir(folder)):
        (broken / name).symlink_to(os.path.join(folder, name))  # the folder's names and images ...
    (broken / "c0_018.jpg").unlink()
    (broken / "c0_018.jpg").write_bytes(b"not a jpeg")  # ... but one, sample 6: the pack stops in shard 2
    out = tmp_path / "out"
    with pytest.raises(DataError, match="c0_018.jpg"):
        packed_copy(str(broken), out, workers=1)
    finished = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert finished == ["shard-000000.tar", "shard-000001.tar"]  # nothing half-written under a final name
    assert sorted(os.listdir(out)) == [WORK, *finished] and not os.path.exists(out / INDEX)
    before = os.stat(out / finished[0])
    with pytest.raises(DataError, match="unfinished pack of other input .*image_size"):
        packed_copy(str(broken), out, size=SIZE + 1)
    (broken / "c0_018.jpg").unlink()
    (broken / "c0_018.jpg").symlink_to(os.path.join(folder, "c0_018.jpg"))
    packed_copy(str(broken), out, workers=2)
    after = os.stat(out / finished[0])
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (out / INDEX).read_bytes() == Path(packed, INDEX).read_bytes()


def test_pack_refuses_a_folder_it_did_not_start(folder, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not empty and holds no pack"):
        packed_copy(folder, tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_pack_refuses_names_that_would_become_paths(tmp_path):
    jpeg(tmp_path / "src" / "c0_a\nb.jpg", 20, 20, 0)
    with pytest.raises(UserError, match="cannot be used as a file name"):
        packed_copy(str(tmp_path / "src"), tmp_path / "out")


def rewrite_index(path, **changes):
    index = read_index(path)
    with open(path, "wb") as f:
        f.write(index._replace(**changes).to_bytes())


def damage(kind, out):
    index_file = os.path.join(out, INDEX)
    index = read_index(index_file)
    shard = os.path.join(out, index.shards[0])
    if kind == "truncated shard":
        os.truncate(shard, index.shard_sizes[0] - 1024)
    elif kind == "corrupt png":
        with open(shard, "r+b") as f:
            f.seek(int(index.offset[0]) + 40)
            f.write(b"\0" * 40)
    elif kind == "offsets":
        rewrite_index(index_file, offset=index.offset + 512)
    elif kind == "count":
        rewrite_index(index_file, label=index.label[:-1])
    elif kind == "shard name":
        rewrite_index(index_file, shards=["../elsewhere.tar", *index.shards[1:]])
    elif kind == "class name":
        rewrite_index(index_file, classes=["a/b", *index.classes[1:]])
    elif kind == "version":
        with np.load(index_file, allow_pickle=False) as npz:
            arrays = {**npz, "version": np.array(99)}
        with open(index_file, "wb") as f:
            np.savez(f, **arrays)
    elif kind == "truncated index":
        os.truncate(index_file, os.path.getsize(index_file) // 2)
    return shard if kind in ("truncated shard", "corrupt png") else index_file


@pytest.mark.parametrize("kind,message", [
    ("truncated shard", "is .* bytes but the index says"), ("corrupt png", "cannot decode 000000000.png"),
    ("offsets", "the index and the shard disagree"), ("count", "differ in length"),
    ("shard name", "cannot be used as a file name"), ("class name", "cannot be used as a file name"),
    ("version", "format version 99"), ("truncated index", "cannot read the packed index"),
])
def test_damaged_packs_are_refused_naming_the_file(folder, packed, tmp_path, kind, message):
    copy = shutil.copytree(packed, tmp_path / "copy")
    named = damage(kind, copy)
    with pytest.raises(UserError, match=message) as error:
        open_images(copy, SIZE, class_cond=True)[0]
    assert str(named) in str(error.value)


def test_train_on_a_damaged_pack_exits_2_naming_the_index(shapes_dir, tmp_path):
    out = packed_copy(shapes_dir, tmp_path / "packed", size=16, workers=1)
    os.truncate(os.path.join(out, INDEX), 100)
    spec = write_spec(tmp_path / "t.yaml", tiny_spec(out, tmp_path / "run"))
    result = idiff_in_process("train", spec, check=False)
    assert result.returncode == 2 and os.path.join(out, INDEX) in result.stderr
    assert not (tmp_path / "run").exists()



def same_packs(a, b):
    """Byte-identical packed folders: the same index (names, labels, offsets) and the same shards (pixels)."""
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert Path(a, name).read_bytes() == Path(b, name).read_bytes(), name


@pytest.mark.parametrize("dataset", ["cifar10", "lsun", "imagenet"])
def test_preparation_packs_directly_what_packing_its_folder_gives(tmp_path, cifar_batches, synsets, dataset):  # noqa: F811
    if dataset == "cifar10":
        args, size = ["--src", cifar_tarball(tmp_path / "c.tar.gz", cifar_batches)], 32
    elif dataset == "lsun":
        values = [encoded(w, h, fmt, seed) for seed, (fmt, w, h) in enumerate(LSUN_VALUES)]
        args, size = ["--src", lsun_lmdb(tmp_path / "bedroom_train_lmdb", values), "--image-size", 16], 16
    else:
        args, size = ["--src", synsets, "--image-size", 8], 8
    folder_args = [a for a in args if a not in ("--image-size", 8)] if dataset == "imagenet" else args
    assert prepare_cli(dataset, *folder_args, "--out", tmp_path / "folder") == 0
    packed_copy(str(tmp_path / "folder"), tmp_path / "from_folder", size=size, workers=1)
    assert prepare_cli(dataset, *args, "--out", tmp_path / "direct", "--packed", "--shard-size", 6000,
                       "--workers", 2) == 0
    same_packs(tmp_path / "from_folder", tmp_path / "direct")


def test_evaluate_reads_a_packed_reference_as_its_folder(folder, packed):
    got, want = find_images(packed, "evaluate.reference"), find_images(folder, "evaluate.reference")
    assert got.count == want.count == 25
    assert np.array_equal(load_images(got, (SIZE, SIZE)), load_images(want, (SIZE, SIZE)))
