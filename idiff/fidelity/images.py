"""Image sets of an evaluation as found on disk: an .npz batch (arr_0), a sample run dir, or a folder of images.

They are checked (kind, shape, count) without being loaded, so that bad input is refused before anything runs.
"""

import hashlib
import sys
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .. import storage
from ..data import list_image_files, open_images
from ..data.packed import count_images, index_path, is_packed
from ..errors import UserError
from ..run_dir import RunDir
from ..shards import npz_headers, read_npz, scan_shards

# How each kind of image set becomes the uint8 images Inception is given: the resize/quantisation path.
NPZ_PATH = "uint8 HWC as stored (idiff samples: round((x+1)*127.5), clipped)"
FOLDER_PATH = "decoded, resized with BOX then BICUBIC and center-cropped as training images, uint8"


@dataclass(frozen=True)
class ImageSource:
    path: str
    what: str  # the spec field, for messages
    count: int
    size: tuple[int, int] | None  # (H, W); None for a folder, whose images are resized to the other set's

    @property
    def is_npz(self) -> bool:
        return self.size is not None

    @property
    def kind(self) -> str:
        return "images-npz" if self.is_npz else "images-folder"

    @property
    def preprocessing(self) -> str:
        return NPZ_PATH if self.is_npz else FOLDER_PATH


def find_images(path, what: str) -> ImageSource:
    """``path`` is an .npz, a sample run dir (its collected .npz) or a folder of images; checked, not loaded."""
    path = str(path)
    if storage.isdir(path):
        collected = sorted(n for n in storage.listdir(path) if n.startswith("samples_") and n.endswith(".npz"))
        if len(collected) > 1:
            raise UserError(f"{what}: {path} holds several collected sample files ({', '.join(collected)}); "
                            f"name one of them")
        if collected:
            return find_images(storage.join(path, collected[0]), what)
        if scan_shards(RunDir(path).samples):
            raise UserError(f"{what}: {path} has sample shards but no collected .npz; run `idiff-collect {path}`")
        return ImageSource(path, what, count_images(path), None)
    if not storage.exists(path):
        raise UserError(f"{what}: {path} does not exist")
    return images_in_npz(path, what, npz_headers(path))


def images_in_npz(path, what: str, headers) -> ImageSource:
    images = headers.get("arr_0")
    if images is None or images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[-1] != 3:
        got = "no arr_0" if images is None else f"arr_0 {images.dtype} {list(images.shape)}"
        raise UserError(f"{what}: {path} holds {got}, expected uint8 images [N, H, W, 3] in arr_0")
    return ImageSource(path, what, images.shape[0], tuple(images.shape[1:3]))


def load_images(source: ImageSource, size: tuple[int, int]) -> np.ndarray:
    """uint8 NHWC; a folder's images are center-cropped and resized to ``size`` as training images are."""
    if source.is_npz:
        return read_npz(source.path, ["arr_0"])["arr_0"]
    dataset = open_images(source.path, size[0])
    return np.stack([((dataset[i].image.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                     for i in tqdm(range(len(dataset)), desc=f"reading {source.what}", unit="img",
                                   disable=not sys.stderr.isatty())])


def content_sha256(source: ImageSource) -> str:
    """sha256 of the file, or of a folder's image files (relative names and bytes, in listing order), or of a
    packed dataset's index (which names every sample, its shard, offset and length)."""
    if source.is_npz:
        return storage.file_digest(source.path)["sha256"]
    if is_packed(source.path):
        return storage.file_digest(index_path(source.path))["sha256"]
    sha = hashlib.sha256()
    for relative in list_image_files(source.path):
        sha.update(relative.encode() + b"\0" + storage.file_digest(storage.join(source.path, relative))["sha256"]
                   .encode())
    return sha.hexdigest()
