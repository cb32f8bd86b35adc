"""Preparation commands on small fixtures in the real formats: names, counts, pixels, clean failures."""

import argparse
import io
import os
import pickle
import tarfile

import lmdb
import numpy as np
import pytest
from PIL import Image

from idiff.data import DataError, ImageDataset
from idiff.data.cli import register
from idiff.data.prepare import SHAPES, staged_output

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def idiff(*argv) -> int:
    """Run ``idiff data ...`` through a parser that has only the data command."""
    parser = argparse.ArgumentParser(prog="idiff")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *map(str, argv)])
    return args.func(args)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def assert_nothing_left(folder, name):
    assert not os.path.exists(folder / name)
    assert not [entry for entry in os.listdir(folder) if ".partial-" in entry]


# ------------------------------------------------------------------------------------------- CIFAR-10


def add_pickle(tar, name, obj):
    # Protocol 2, like the Python 2 pickles of the real tarball.
    data = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def cifar_batches():
    """Two images per training batch and three in the test batch, as [n, 3072] rows of R, G, B planes."""
    rng = np.random.default_rng(0)
    sizes = {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 3}
    return {name: {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   "labels": rng.integers(0, 10, n).tolist(), "batch_label": name} for name, n in sizes.items()}


def cifar_tarball(path, batches, extra=None):
    with tarfile.open(path, "w:gz") as tar:
        add_pickle(tar, "batches.meta", {"label_names": CIFAR_CLASSES, "num_vis": 3072})
        for name, batch in {**batches, **(extra or {})}.items():
            add_pickle(tar, name, batch)
    return path


@pytest.mark.parametrize("split,names", [("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])])
def test_cifar10_writes_class_named_pngs_with_the_source_pixels(tmp_path, cifar_batches, split, names):
    src = cifar_tarball(tmp_path / "cifar-10-python.tar.gz", cifar_batches)
    assert idiff("cifar10", "--src", src, "--out", tmp_path / "out", "--split", split) == 0
    rows = np.concatenate([cifar_batches[n]["data"] for n in names])
    labels = sum((cifar_batches[n]["labels"] for n in names), [])
    expected = [f"{CIFAR_CLASSES[label]}_{i:05d}.png" for i, label in enumerate(labels)]
    assert listing(tmp_path / "out") == sorted(expected)
    for name, row in zip(expected, rows):
        np.testing.assert_array_equal(pixels(tmp_path / "out" / name), row.reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar10_missing_batch_leaves_no_output(tmp_path, cifar_batches):
    del cifar_batches["data_batch_4"]
    src = cifar_tarball(tmp_path / "c.tar.gz", cifar_batches)
    with pytest.raises(DataError, match="no data_batch_4"):
        idiff("cifar10", "--src", src, "--out", tmp_path / "out")
    assert_nothing_left(tmp_path, "out")


class RunsCode:
    def __reduce__(self):
        return os.getcwd, ()


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path, cifar_batches):
    src = cifar_tarball(tmp_path / "c.tar.gz", cifar_batches, extra={"test_batch": RunsCode()})
    with pytest.raises(DataError, match="test_batch.*unexpected object"):
        idiff("cifar10", "--src", src, "--out", tmp_path / "out", "--split", "test")
    with pytest.raises(DataError, match="cannot open the CIFAR-10 tarball"):
        idiff("cifar10", "--src", tmp_path / "nothing.tar.gz", "--out", tmp_path / "out")


# ------------------------------------------------------------------------------------------- LSUN


def encoded(width, height, fmt, seed) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format=fmt)
    return buffer.getvalue()


def lsun_lmdb(path, values):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(f"{i:040x}".encode(), value)
    env.close()
    return path


def expected_square(data: bytes, size: int) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(scale * image.width), round(scale * image.height)), resample=Image.BOX)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


LSUN_VALUES = [("WEBP", 40, 30), ("JPEG", 30, 50), ("WEBP", 16, 16), ("JPEG", 64, 33), ("WEBP", 21, 80)]


@pytest.mark.parametrize("limit", [None, 3])
def test_lsun_writes_center_squares_in_record_order(tmp_path, limit):
    values = [encoded(w, h, fmt, seed) for seed, (fmt, w, h) in enumerate(LSUN_VALUES)]
    src = lsun_lmdb(tmp_path / "bedroom_train_lmdb", values)
    argv = ["lsun", "--src", src, "--out", tmp_path / "out", "--image-size", 16]
    assert idiff(*argv, *(["--limit", limit] if limit else [])) == 0
    count = limit or len(values)
    assert listing(tmp_path / "out") == [f"bedroom_{i:07d}.png" for i in range(count)]
    for i in range(count):
        np.testing.assert_array_equal(pixels(tmp_path / "out" / f"bedroom_{i:07d}.png"), expected_square(values[i], 16))


def test_lsun_bad_record_or_folder_leaves_no_output(tmp_path):
    src = lsun_lmdb(tmp_path / "church_lmdb", [encoded(20, 20, "WEBP", 0), b"RIFF....WEBPbroken"])
    with pytest.raises(DataError, match="cannot decode record"):
        idiff("lsun", "--src", src, "--out", tmp_path / "out", "--image-size", 8)
    assert_nothing_left(tmp_path, "out")
    with pytest.raises(DataError, match="cannot open the LMDB"):
        idiff("lsun", "--src", tmp_path / "absent", "--out", tmp_path / "out")


# ------------------------------------------------------------------------------------------- ImageNet


@pytest.fixture
def synsets(tmp_path):
    src = tmp_path / "train"
    files = ["n01440764/n01440764_10026.JPEG", "n01440764/ILSVRC2012_val_00000001.JPEG",
             "n01443537/n01443537_2.jpeg", "n01443537/LICENSE.txt"]
    for i, rel in enumerate(files):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(encoded(12, 10, "JPEG", i) if rel.lower().endswith("jpeg") else b"text")
    return src


IMAGENET_SOURCES = {  # output name: source; train files keep their names, others get the synset in front
    "n01440764_10026.JPEG": "n01440764/n01440764_10026.JPEG",
    "n01440764_ILSVRC2012_val_00000001.JPEG": "n01440764/ILSVRC2012_val_00000001.JPEG",
    "n01443537_2.jpeg": "n01443537/n01443537_2.jpeg",
}


@pytest.mark.parametrize("mode", ["link", "copy"])
def test_imagenet_flattens_synsets_into_prefixed_names(tmp_path, synsets, mode):
    out = tmp_path / "out"
    assert idiff("imagenet", "--src", synsets, "--out", out, "--mode", mode) == 0
    assert listing(out) == list(IMAGENET_SOURCES)
    for name, source in IMAGENET_SOURCES.items():
        assert os.path.islink(out / name) == (mode == "link")
        assert (out / name).read_bytes() == (synsets / source).read_bytes()
    assert ImageDataset(str(out), 8, class_cond=True).classes == ["n01440764", "n01443537"]


def test_imagenet_refuses_folder_names_that_break_labels(tmp_path, synsets):
    (synsets / "bad_name").mkdir()
    with pytest.raises(DataError, match="'bad_name'"):
        idiff("imagenet", "--src", synsets, "--out", tmp_path / "out")
    with pytest.raises(DataError, match="no class folders"):
        idiff("imagenet", "--src", synsets / "n01440764", "--out", tmp_path / "out")


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_labelled_balanced_and_deterministic(tmp_path):
    assert idiff("synthetic", "--out", tmp_path / "a", "--n", 12, "--image-size", 16, "--classes", 4) == 0
    names = listing(tmp_path / "a")
    assert names == sorted(f"{SHAPES[i % 4]}_{i:05d}.png" for i in range(12))
    ds = ImageDataset(str(tmp_path / "a"), 16, class_cond=True)
    assert ds.classes == sorted(SHAPES[:4]) and np.bincount(ds.labels).tolist() == [3, 3, 3, 3]
    first = pixels(tmp_path / "a" / names[0])
    assert first.shape == (16, 16, 3) and first.std() > 10  # a shape on a background, not a flat square
    idiff("synthetic", "--out", tmp_path / "b", "--n", 12, "--image-size", 16, "--classes", 4)
    idiff("synthetic", "--out", tmp_path / "c", "--n", 12, "--image-size", 16, "--classes", 4, "--seed", 1)
    same = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names]
    other = [(tmp_path / "a" / n).read_bytes() == (tmp_path / "c" / n).read_bytes() for n in names]
    assert all(same) and not any(other)


def test_synthetic_checks_its_arguments(tmp_path):
    with pytest.raises(DataError, match=f"between 1 and {len(SHAPES)}"):
        idiff("synthetic", "--out", tmp_path / "out", "--classes", len(SHAPES) + 1)
    assert_nothing_left(tmp_path, "out")


# ------------------------------------------------------------------------------------------- output folder


def test_output_must_be_new_or_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    assert idiff("synthetic", "--out", tmp_path / "empty", "--n", 2, "--image-size", 8) == 0
    assert len(listing(tmp_path / "empty")) == 2
    with pytest.raises(DataError, match="already exists and is not an empty folder"):
        idiff("synthetic", "--out", tmp_path / "empty", "--n", 2, "--image-size", 8)


def test_interrupted_output_is_removed(tmp_path):
    with pytest.raises(KeyboardInterrupt), staged_output(str(tmp_path / "out")) as staging:
        open(os.path.join(staging, "half.png"), "wb").close()
        raise KeyboardInterrupt
    assert_nothing_left(tmp_path, "out")
