"""The packed data format: images preprocessed once, in WebDataset tar shards, found through one index.

A packed dataset is a folder (local, gs://, az://) holding ``INDEX`` and the shards it names. Each
shard is a plain ustar archive of ``{key}.png`` (and, with classes, ``{key}.cls``: the label in
decimal) members; the key of sample i is ``sample_key(i)``. The png holds the uint8 pixels that the
reader's resize and crop gave at the index's image size, so decoding it and scaling to [-1, 1] gives
the folder's tensor bit for bit. The index (an uncompressed .npz, read with allow_pickle=False) holds
everything a rank needs at start-up; reading a sample is one ranged read of its tar header and data.
docs/packed-data.md describes the fields.
"""

import hashlib
import io
import os
import tarfile
import zipfile
from typing import NamedTuple

import blobfile as bf
import numpy as np
from PIL import Image

from .. import storage
from .reader import (
    DECODE_ERRORS,
    DataError,
    Example,
    ImageDataset,
    flipped_if_drawn,
    list_image_files,
    to_model_input,
    warn_upscaled,
)

INDEX = "idiff-index.npz"
FORMAT = "idiff-packed"
VERSION = 1
HEADER = tarfile.BLOCKSIZE  # a ustar member header: the data follows it directly
PER_SAMPLE = {"shard": np.uint32, "offset": np.int64, "length": np.int64, "label": np.int32, "upscaled": np.bool_}


def sample_key(index: int) -> str:
    """The WebDataset key of sample ``index``: digits only, so it never holds a '.' or a path separator."""
    return f"{index:09d}"


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def index_path(data_dir) -> str:
    return storage.join(data_dir, INDEX)


def is_packed(data_dir) -> bool:
    """Whether ``data_dir`` is a packed dataset: one existence check, no listing."""
    return storage.exists(index_path(data_dir))


def names_fingerprint(names_blob: bytes) -> str:
    """reader.fingerprint of the names, from their newline-joined UTF-8 text."""
    return hashlib.sha256(names_blob).hexdigest()


class Index(NamedTuple):
    image_size: int
    fingerprint: str
    names: bytes  # the source names, relative to the packed folder, joined by "\n", UTF-8
    classes: list[str]  # empty without classes
    shards: list[str]  # shard file names, by shard number
    shard_sizes: np.ndarray  # int64 [S], bytes
    shard: np.ndarray  # per sample, as PER_SAMPLE types them: [N] each
    offset: np.ndarray  # of the png data in its shard
    length: np.ndarray  # of the png data
    label: np.ndarray  # -1 without classes
    upscaled: np.ndarray  # the source was smaller than image_size

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, format=np.array(FORMAT), version=np.array(VERSION), image_size=np.array(self.image_size),
                 fingerprint=np.array(self.fingerprint), names=np.frombuffer(self.names, np.uint8),
                 classes=np.array(self.classes, dtype=str), shards=np.array(self.shards, dtype=str),
                 shard_sizes=np.asarray(self.shard_sizes, np.int64),
                 **{k: np.asarray(getattr(self, k), t) for k, t in PER_SAMPLE.items()})
        return buffer.getvalue()


def read_index(path: str) -> Index:
    """The index at ``path``, checked against itself; DataError naming the file when it cannot be used."""
    try:
        with bf.BlobFile(path, "rb") as f:
            data = f.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read the packed index {path}: {e}") from None
    if arrays.get("format", np.array("")).item() != FORMAT:
        raise DataError(f"{path} is not an idiff packed index (no format {FORMAT!r})")
    version = arrays.get("version", np.array(-1)).item()
    if version != VERSION:
        raise DataError(f"{path} is packed data of format version {version}; this idiff reads version {VERSION}: "
                        f"pack the source again")
    missing = [k for k in ("image_size", "fingerprint", "names", "classes", "shards", "shard_sizes", *PER_SAMPLE)
               if k not in arrays]
    if missing:
        raise DataError(f"{path}: the packed index lacks {', '.join(missing)}")
    try:
        index = Index(image_size=int(arrays["image_size"]), fingerprint=str(arrays["fingerprint"]),
                      names=arrays["names"].astype(np.uint8).tobytes(), classes=[str(c) for c in arrays["classes"]],
                      shards=[str(s) for s in arrays["shards"]], shard_sizes=arrays["shard_sizes"].astype(np.int64),
                      **{k: arrays[k].astype(t, casting="same_kind") for k, t in PER_SAMPLE.items()})
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: a field of the packed index has the wrong type: {e}") from None
    check_index(index, path)
    return index


def check_index(index: Index, path: str) -> None:
    """The consistency an index must have before any shard is read (vectorised: no file is touched)."""
    count = len(index.shard)
    if any(getattr(index, k).shape != (count,) for k in PER_SAMPLE):
        raise DataError(f"{path}: the per-sample arrays of the packed index differ in length")
    if count == 0:
        raise DataError(f"{path}: the packed index holds no samples")
    if names_fingerprint(index.names) != index.fingerprint or index.names.count(b"\n") + 1 != count:
        raise DataError(f"{path}: the source names of the packed index do not match its fingerprint and count")
    for name in [*index.shards, *index.classes]:
        storage.checked_name(name, path)
    if len(index.shard_sizes) != len(index.shards):
        raise DataError(f"{path}: {len(index.shards)} shards but {len(index.shard_sizes)} shard sizes")
    if int(index.shard.max()) >= len(index.shards):
        raise DataError(f"{path}: a sample names shard {int(index.shard.max())} of {len(index.shards)}")
    ends = index.offset + index.length
    if (index.offset < HEADER).any() or (index.length <= 0).any() or (ends > index.shard_sizes[index.shard]).any():
        raise DataError(f"{path}: a sample's offset and length lie outside its shard")
    if index.classes and not ((index.label >= 0) & (index.label < len(index.classes))).all():
        raise DataError(f"{path}: a label is not one of the {len(index.classes)} classes")


class _Shard:
    """One open shard: ranged reads by offset (pread locally, a ranged GET through blobfile on a store)."""

    def __init__(self, path: str, size: int):
        self.path = path = storage.cached_locally(path)  # a store's shard, or its local copy (IDIFF_SHARD_CACHE)
        if storage.is_remote(path):  # a short read finds a truncated shard there, without a stat
            self.fd, self.blob = None, storage.open_for_ranged_reads(path)
            return
        try:
            self.fd, self.blob = os.open(path, os.O_RDONLY), None
        except OSError as e:
            raise DataError(f"cannot open shard {path}: {e}") from None
        actual = os.fstat(self.fd).st_size
        if actual != size:
            os.close(self.fd)
            raise DataError(f"shard {path} is {actual} bytes but the index says {size}: truncated or replaced")

    def read(self, offset: int, length: int) -> bytes:
        if self.fd is not None:
            data = os.pread(self.fd, length, offset)
        else:
            self.blob.seek(offset)
            data = self.blob.read(length)
        if len(data) != length:
            raise DataError(f"shard {self.path} ends at byte {offset + len(data)}, before the sample at {offset}: "
                            f"truncated")
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        else:
            self.blob.close()


class PackedDataset:
    """A packed dataset read as ImageDataset reads its folder: the same examples, labels and fingerprint."""

    def __init__(self, data_dir, image_size: int, class_cond: bool = False, random_flip: bool = False,
                 seed: int = 0):
        self.data_dir = str(data_dir)
        self.image_size, self.random_flip, self.seed = image_size, random_flip, seed
        self.index_file = index_path(self.data_dir)
        index = read_index(self.index_file)
        if index.image_size != image_size:
            raise DataError(f"{self.data_dir} is packed at {index.image_size} px, but {image_size} px images are "
                            f"needed: pack the source again with --image-size {image_size}")
        self._index = index
        self.fingerprint = index.fingerprint
        self.num_upscaled = int(index.upscaled.sum())  # known from the pack: the loader need not count
        warn_upscaled(self.num_upscaled, len(self), image_size, f"packed in {self.data_dir}")
        self.classes, self.labels = (None, None)
        if class_cond:
            if not index.classes:
                raise DataError(f"class_cond needs classes, but {self.data_dir} was packed from files without a "
                                f"class prefix before '_' in every name")
            self.classes, self.labels = index.classes, index.label
        self._files = None
        self._open: dict[int, _Shard] = {}  # the open shards of process _pid
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._index.shard)

    @property
    def files(self) -> list[str]:
        """The source names (for messages), split from the index's text when first asked for."""
        if self._files is None:
            self._files = self._index.names.decode().split("\n")
        return self._files

    def __getitem__(self, index: int) -> Example:
        return self.read(index)

    def read(self, index: int, position: int = -1) -> Example:
        """Sample ``index`` as ImageDataset.read gives it; a damaged shard is a DataError naming it."""
        pixels = self.pixels(index)
        arr = flipped_if_drawn(to_model_input(pixels), self.random_flip, self.seed, position)
        label = int(self.labels[index]) if self.labels is not None else -1
        return Example(arr, label, position, index, bool(self._index.upscaled[index]))

    def pixels(self, index: int) -> np.ndarray:
        """The stored uint8 [H, W, 3] pixels of sample ``index``, read with its tar header and checked."""
        number, offset, length = (int(self._index.shard[index]), int(self._index.offset[index]),
                                  int(self._index.length[index]))
        shard = self._shard(number)
        data = shard.read(offset - HEADER, HEADER + length)
        key = sample_key(index)
        try:
            member = tarfile.TarInfo.frombuf(data[:HEADER], "utf-8", "surrogateescape")
        except tarfile.TarError as e:
            member = e
        if not isinstance(member, tarfile.TarInfo) or member.name != f"{key}.png" or member.size != length:
            raise DataError(f"shard {shard.path}: no {key}.png of {length} bytes at byte {offset} as the index "
                            f"{self.index_file} says: the index and the shard disagree")
        try:
            pixels = np.asarray(Image.open(io.BytesIO(data[HEADER:]), formats=["PNG"]))
        except DECODE_ERRORS as e:
            raise DataError(f"shard {shard.path}: cannot decode {key}.png: {e}") from None
        if pixels.shape != (self.image_size, self.image_size, 3):
            raise DataError(f"shard {shard.path}: {key}.png is {list(pixels.shape)}, expected "
                            f"{self.image_size}x{self.image_size} RGB")
        return pixels

    def _shard(self, number: int) -> _Shard:
        if self._pid != os.getpid():  # a forked loader worker: its own handles, not its parent's
            self._open, self._pid = {}, os.getpid()
        if number not in self._open:
            path = storage.join(self.data_dir, self._index.shards[number])
            self._open[number] = _Shard(path, int(self._index.shard_sizes[number]))
        return self._open[number]

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()

    def __getstate__(self) -> dict:
        """Open shards stay with the process that opened them: a spawned loader worker opens its own."""
        return {**self.__dict__, "_open": {}, "_pid": None}


def open_images(data_dir, image_size: int, class_cond: bool = False, random_flip: bool = False, seed: int = 0,
                skip_corrupt: bool = False):
    """The images of ``data_dir``: a PackedDataset when it holds an index, else the folder's ImageDataset.

    ``skip_corrupt`` matters to folders only: packing refused any image it could not decode.
    """
    if is_packed(data_dir):
        return PackedDataset(data_dir, image_size, class_cond=class_cond, random_flip=random_flip, seed=seed)
    return ImageDataset(data_dir, image_size, class_cond=class_cond, random_flip=random_flip, seed=seed,
                        skip_corrupt=skip_corrupt)


def count_images(data_dir) -> int:
    """How many images ``data_dir`` holds: from a packed dataset's index, else by listing the folder."""
    if is_packed(data_dir):
        return len(read_index(index_path(data_dir)).shard)
    return len(list_image_files(str(data_dir)))
