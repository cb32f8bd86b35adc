"""An image folder read as the original improved-diffusion reads it: same files, labels and pixels.

Files: every .jpg .jpeg .png .gif (any case) below the folder, found by one recursive listing
(local paths, gs://, az:// through blobfile). Label: the file name's prefix before the first "_".
Pixels: RGB, halved with BOX while the short side is at least twice the target, BICUBIC to the
target short side, center crop, scaled to [-1, 1], channels first.

One difference from improved-diffusion: it converts to RGB after resizing, so palette images were
resized with nearest neighbour and RGBA ones with premultiplied alpha. Converting first (as
guided-diffusion does) fixes that and gives the same pixels for RGB and grayscale files.
"""

import concurrent.futures
import hashlib
import logging
import os
import stat
from typing import NamedTuple

import blobfile as bf
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..rng import Stream, derive_seed

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
EXTENSION_LIST = " ".join(f".{ext}" for ext in IMAGE_EXTENSIONS)
# What Pillow raises for a file it cannot decode: unknown format, truncation, broken chunks, bombs.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class DataError(UserError):
    """A data folder, image or preparation input that cannot be used as it is."""


class Example(NamedTuple):
    image: np.ndarray  # float32 [3, H, W] in [-1, 1]
    label: int  # -1 without classes
    position: int  # global stream position, -1 when read outside a stream
    index: int  # into ImageDataset.files
    upscaled: bool  # the file was smaller than the target size


def is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def list_image_files(data_dir: str) -> list[str]:
    """Image paths relative to ``data_dir``, in the original's order: sorted names, depth first.

    Only regular files count: a FIFO, socket or device named like an image is skipped with a warning naming
    it, since reading one could block forever (a FIFO without a writer) and hold up a stop.
    """
    skipped = []
    found = _image_files(str(data_dir), skipped)
    if skipped:
        log.warning("skipped %d image name(s) under %s that are not regular files (FIFOs, sockets or devices): %s",
                    len(skipped), data_dir, ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
    return found


def _image_files(data_dir: str, skipped: list[str]) -> list[str]:
    found = []
    for name, kind in _entries(data_dir):
        if kind == "dir":
            found.extend(f"{name}/{rel}" for rel in _image_files(bf.join(data_dir, name), skipped))
        elif is_image_name(name):
            if kind == "file":
                found.append(name)
            else:
                skipped.append(bf.join(data_dir, name))
    return found


def _entries(folder: str) -> list[tuple[str, str]]:
    """(name, "dir" | "file" | "other") of each entry of ``folder``, sorted by name. Locally the kind comes
    from the listing itself (no read); blob stores hold only objects and prefixes."""
    try:
        if "://" in folder:
            entries = [(e.name, "dir" if e.is_dir else "file") for e in bf.scandir(folder)]
        else:
            with os.scandir(folder) as listing:
                entries = [(e.name, "dir" if e.is_dir() else "file" if e.is_file() else "other") for e in listing]
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"data_dir {folder} is not a folder: expected one holding {EXTENSION_LIST} files") from None
    return sorted(entries)


def fingerprint(relative_paths: list[str]) -> str:
    """Identity of a file list: the same relative paths in the same order give the same value."""
    return hashlib.sha256("\n".join(relative_paths).encode()).hexdigest()


def class_prefix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.split("_", 1)[0] if "_" in name else ""


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` of an [H, W, C] array; odd margins leave the extra pixel at the end."""
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """The original's resize and crop of a decoded image: float32 [3, size, size] in [-1, 1]."""
    return to_model_input(resize_and_crop(image, size))


def resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
    """The original's resize and center crop: uint8 [size, size, 3]. Packing stores exactly these pixels.

    The conversion to RGB comes after resizing, as in the original: Pillow resizes palette images
    with nearest-neighbour and RGBA ones with premultiplied alpha, and results must stay comparable.
    """
    # BOX halving first (what Pillow's reducing_gap does) keeps large downscales from aliasing.
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    return center_crop(np.asarray(image.convert("RGB")), size)


def to_model_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] pixels as the model takes them: float32 [3, H, W] in [-1, 1]."""
    arr = pixels.astype(np.float32) / 127.5 - 1
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode(path: str) -> Image.Image:
    """The fully decoded image, or DataError naming the file."""
    try:
        with _open_regular(path) as f:
            image = Image.open(f)
            image.load()
        return image
    except DECODE_ERRORS as e:
        raise DataError(f"cannot read image {path}: {e}") from None


def _open_regular(path: str):
    """``path`` opened for reading; a local one only when it is a regular file. The open itself does not wait
    (O_NONBLOCK: opening a FIFO without a writer would block), so a file that became a FIFO after the listing
    is an error, not a hang that holds up a stop."""
    if "://" in path:
        return bf.BlobFile(path, "rb")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file (a FIFO, socket or device)")
    os.set_blocking(fd, True)
    return open(fd, "rb")


def flip_at(seed: int, position: int) -> bool:
    """The random-flip decision for one stream position: independent of workers, ranks and resumes."""
    return derive_seed(seed, Stream.DATA_FLIP, position) % 2 == 1


def flipped_if_drawn(arr: np.ndarray, random_flip: bool, seed: int, position: int) -> np.ndarray:
    """``arr`` mirrored left-right when random_flip is on and the draw for stream ``position`` says so."""
    if random_flip and position >= 0 and flip_at(seed, position):
        return np.ascontiguousarray(arr[:, :, ::-1])
    return arr


def labels_from_prefixes(paths: list[str], where: str) -> tuple[list[str], list[int]]:
    """Sorted class names and each path's label, from the file names' prefixes before '_'."""
    prefixes = [class_prefix(path) for path in paths]
    unlabelled = [path for path, prefix in zip(paths, prefixes) if not prefix]
    if unlabelled:
        raise DataError(
            f"class_cond needs a class prefix before '_' in every file name; {len(unlabelled)} of "
            f"{len(paths)} files under {where} have none, e.g. {unlabelled[0]}")
    classes = sorted(set(prefixes))
    class_index = {name: i for i, name in enumerate(classes)}
    return classes, [class_index[prefix] for prefix in prefixes]


class ImageDataset:
    """The image files under ``data_dir`` with their labels; ``read`` gives one preprocessed example."""

    def __init__(self, data_dir: str, image_size: int, class_cond: bool = False, random_flip: bool = False,
                 seed: int = 0, skip_corrupt: bool = False):
        if not data_dir:
            raise DataError("no data_dir given")
        self.data_dir = str(data_dir)
        self.image_size = image_size
        self.random_flip = random_flip
        self.seed = seed
        relative = list_image_files(self.data_dir)
        if not relative:
            raise DataError(f"no images under {self.data_dir}: expected files ending in {EXTENSION_LIST}")
        # None: sizes unknown until read, so the loader counts upscaled images as it goes.
        self.num_upscaled: int | None = None
        if skip_corrupt:
            relative = self._readable(relative)
        self.files = [bf.join(self.data_dir, rel) for rel in relative]
        self.fingerprint = fingerprint(relative)
        self.classes, self.labels = self._labels() if class_cond else (None, None)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Example:
        return self.read(index)

    def read(self, index: int, position: int = -1) -> Example:
        """File ``index`` preprocessed; with random_flip, mirrored as decided for stream ``position``."""
        path = self.files[index]
        image = decode(path)
        arr = flipped_if_drawn(preprocess(image, self.image_size), self.random_flip, self.seed, position)
        label = self.labels[index] if self.labels is not None else -1
        return Example(arr, label, position, index, min(image.size) < self.image_size)

    def _labels(self) -> tuple[list[str], list[int]]:
        return labels_from_prefixes(self.files, self.data_dir)

    def _readable(self, relative: list[str]) -> list[str]:
        """Decode every file once (skip_corrupt): keep the readable ones, count the small ones."""
        paths = [bf.join(self.data_dir, rel) for rel in relative]
        # Threads: Pillow decodes without the GIL, and blob stores answer many requests at once.
        with concurrent.futures.ThreadPoolExecutor() as pool:
            sides = list(tqdm(pool.map(_short_side_or_none, paths), total=len(paths),
                              desc=f"verifying {self.data_dir}", unit="img"))
        corrupt = [path for path, side in zip(paths, sides) if side is None]
        if corrupt:
            log.warning("skipped %d unreadable of %d images under %s, e.g. %s",
                        len(corrupt), len(paths), self.data_dir, corrupt[0])
        if len(corrupt) == len(paths):
            raise DataError(f"no readable images under {self.data_dir}: all {len(paths)} failed to decode")
        readable = [side for side in sides if side is not None]
        self.num_upscaled = sum(side < self.image_size for side in readable)
        warn_upscaled(self.num_upscaled, len(readable), self.image_size, f"under {self.data_dir}")
        return [rel for rel, side in zip(relative, sides) if side is not None]


def _short_side_or_none(path: str) -> int | None:
    try:
        return min(decode(path).size)
    except DataError:
        return None


def warn_upscaled(count: int, total: int, image_size: int, where: str) -> None:
    if count:
        log.warning("%d of %d images %s are smaller than %d px: upscaled (bicubic) as the original does",
                    count, total, where, image_size)
