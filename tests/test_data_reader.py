"""The reader: which files, which labels, which pixels (as the original computes them), which errors."""

import logging
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idiff.data import DataError, ImageDataset, list_image_files
from idiff.errors import UserError


def noise(width, height, mode="RGB", seed=0) -> Image.Image:
    """Noise plus a gradient: every resampling filter changes it, so any deviation shows."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, width)[None, :, None] + np.linspace(0, 60, height)[:, None, None]
    arr = np.clip(ramp + rng.integers(0, 96, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(arr)
    if mode == "P":
        return image.quantize(64)
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)))
        return image
    return image.convert(mode)


def save(image: Image.Image, path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return str(path)


def expected_pixels(path, size) -> np.ndarray:
    """The original's preprocessing spelled out with Pillow and numpy: resize in the file's own mode
    (palette images nearest-neighbour, RGBA premultiplied), convert to RGB last, crop, scale."""
    image = Image.open(path)
    image.load()
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    arr = np.array(image.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    arr = arr[top : top + size, left : left + size]
    return (arr.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)


CASES = [  # name, mode, width, height, target
    ("wide.png", "RGB", 301, 97, 32),  # one BOX halving, then bicubic down, odd crop
    ("tall.jpg", "RGB", 70, 260, 32),
    ("gray.png", "L", 128, 128, 32),  # two halvings land exactly on the target
    ("alpha.png", "RGBA", 90, 66, 16),
    ("palette.png", "P", 50, 41, 16),
    ("palette.gif", "P", 33, 64, 16),
    ("SHOUT.JPEG", "RGB", 65, 64, 32),  # short side just below twice the target
    ("tiny.jpeg", "RGB", 20, 13, 32),  # smaller than the target: upscaled
]


@pytest.mark.parametrize("name,mode,width,height,size", CASES)
def test_pixels_match_the_recipe_exactly(tmp_path, name, mode, width, height, size):
    path = save(noise(width, height, mode), tmp_path / name)
    example = ImageDataset(str(tmp_path), size)[0]
    assert example.image.dtype == np.float32 and example.image.shape == (3, size, size)
    np.testing.assert_array_equal(example.image, expected_pixels(path, size))
    assert example.upscaled == (min(width, height) < size)
    assert example.label == -1


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    for rel in ["b_2.png", "a_1.JPG", "sub/c_3.gif", "sub/deeper/a_4.jpeg", "album.png/b_5.png"]:
        save(noise(12, 12), root / rel)
    for rel in ["notes.txt", "noext", "sub/x.webp"]:
        (root / rel).write_bytes(b"not an image")
    return root


def test_listing_is_recursive_sorted_and_by_extension(tree):
    assert list_image_files(str(tree)) == ["a_1.JPG", "album.png/b_5.png", "b_2.png", "sub/c_3.gif",
                                           "sub/deeper/a_4.jpeg"]
    ds = ImageDataset(str(tree), 8)
    assert ds.files == [str(tree / rel) for rel in list_image_files(str(tree))]
    assert ds.classes is None and ds.labels is None


def test_labels_are_file_name_prefixes_ignoring_folders(tree):
    ds = ImageDataset(str(tree), 8, class_cond=True)
    assert ds.classes == ["a", "b", "c"]
    assert ds.labels == [0, 1, 1, 2, 0]
    assert [ds[i].label for i in range(len(ds))] == ds.labels


@pytest.mark.parametrize("name", ["plain.png", "_lead.png"])
def test_class_cond_without_prefix_names_a_file(tree, name):
    save(noise(8, 8), tree / "sub" / name)
    with pytest.raises(DataError, match=f"class_cond.*1 of 6 files.*{name}"):
        ImageDataset(str(tree), 8, class_cond=True)


def test_missing_or_empty_folder_is_named_with_the_extensions(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    for folder in ["missing", "empty"]:
        with pytest.raises(DataError, match=f"{tmp_path / folder}.*\\.jpg \\.jpeg \\.png \\.gif") as info:
            ImageDataset(str(tmp_path / folder), 8)
        assert isinstance(info.value, UserError)
    with pytest.raises(DataError, match="no data_dir"):
        ImageDataset("", 8)


@pytest.fixture
def with_corrupt(tmp_path):
    """Two good images, one truncated PNG, one JPEG that is random bytes, one image below the target size."""
    for i in range(2):
        save(noise(40, 40, seed=i), tmp_path / f"good_{i}.png")
    whole = Path(save(noise(40, 40), tmp_path / "cut_0.png"))
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (tmp_path / "junk_0.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    save(noise(6, 9), tmp_path / "small_0.png")
    return tmp_path


def test_corrupt_image_raises_naming_the_file(with_corrupt):
    ds = ImageDataset(str(with_corrupt), 8)
    for name in ["cut_0.png", "junk_0.jpg"]:
        with pytest.raises(DataError, match=f"cannot read image {with_corrupt / name}"):
            ds.read(ds.files.index(str(with_corrupt / name)))


def test_skip_corrupt_drops_and_counts_unreadable_and_small_files(with_corrupt, caplog):
    with caplog.at_level(logging.WARNING):
        ds = ImageDataset(str(with_corrupt), 8, skip_corrupt=True)
    assert [p.rsplit("/", 1)[1] for p in ds.files] == ["good_0.png", "good_1.png", "small_0.png"]
    assert "skipped 2 unreadable of 5 images" in caplog.text and "cut_0.png" in caplog.text
    assert ds.num_upscaled == 1 and "1 of 3 images under" in caplog.text
    assert ds.fingerprint != ImageDataset(str(with_corrupt), 8).fingerprint


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="no readable images.*all 1 failed"):
        ImageDataset(str(tmp_path), 8, skip_corrupt=True)


def test_flips_depend_on_seed_and_position_only(tmp_path):
    save(noise(16, 16), tmp_path / "x.png")
    plain = ImageDataset(str(tmp_path), 16)[0].image
    mirrored = plain[:, :, ::-1]

    def flips(seed):
        ds = ImageDataset(str(tmp_path), 16, random_flip=True, seed=seed)
        images = [ds.read(0, position).image for position in range(24)]
        assert all(np.array_equal(im, plain) or np.array_equal(im, mirrored) for im in images)
        return [np.array_equal(im, mirrored) for im in images]

    decisions = flips(seed=1)
    assert 0 < sum(decisions) < len(decisions)
    assert flips(seed=1) == decisions and flips(seed=2) != decisions
    assert np.array_equal(ImageDataset(str(tmp_path), 16, random_flip=True)[0].image, plain)  # no position: no flip


def test_fingerprint_follows_relative_names_not_location(tree, tmp_path):
    moved = shutil.copytree(tree, tmp_path / "elsewhere")
    assert ImageDataset(str(moved), 8).fingerprint == ImageDataset(str(tree), 8).fingerprint
    save(noise(8, 8), moved / "z_9.png")
    assert ImageDataset(str(moved), 8).fingerprint != ImageDataset(str(tree), 8).fingerprint


@pytest.fixture
def with_special_files(tmp_path):
    """Two images, and a FIFO, a socket and a FIFO in a subfolder, each named like an image."""
    for i in range(2):
        save(noise(16, 16, seed=i), tmp_path / f"good_{i}.png")
    os.mkfifo(tmp_path / "pipe_0.png")
    (tmp_path / "sub").mkdir()
    os.mkfifo(tmp_path / "sub" / "pipe_1.jpg")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock_0.gif"))
    return tmp_path


def test_fifos_sockets_and_devices_are_skipped_at_listing_naming_them(with_special_files, caplog):
    with caplog.at_level(logging.WARNING):
        ds = ImageDataset(str(with_special_files), 8)
    assert [p.rsplit("/", 1)[1] for p in ds.files] == ["good_0.png", "good_1.png"]
    assert "skipped 3 image name(s)" in caplog.text and "not regular files" in caplog.text
    for name in ["pipe_0.png", "sub/pipe_1.jpg", "sock_0.gif"]:
        assert str(with_special_files / name) in caplog.text
    assert all(ds.read(i).image.shape == (3, 8, 8) for i in range(len(ds)))


def test_reading_a_fifo_fails_at_once_instead_of_blocking(with_special_files):
    """A file that became a FIFO after the listing: the read is refused, it does not wait for a writer."""
    ds = ImageDataset(str(with_special_files), 8)
    pipe = str(with_special_files / "pipe_0.png")
    ds.files[0] = pipe
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(DataError, ds.read, 0)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # on a blocking open: let the read end, then fail
        with open(pipe, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert f"cannot read image {pipe}" in str(outcome[0].value) and "not a regular file" in str(outcome[0].value)
