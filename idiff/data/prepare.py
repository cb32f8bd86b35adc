"""Turn published data sets into label-prefixed image folders that ImageDataset reads.

Every command writes into a hidden staging folder beside ``out`` and renames it to ``out`` only when
all files are written, so ``out`` is either absent or complete: an interrupted run leaves at most a
``.NAME.partial-HOST-PID-*`` folder (removed on errors and Ctrl-C; a killed process leaves one behind,
which the next run for the same ``out`` removes), and a rerun starts from scratch. An existing non-empty
``out`` is refused.

CIFAR-10, LSUN and ImageNet are also sources for ``pack.pack`` (``--packed``): the same names, in the
order the reader lists the folder they would make, and the same images, so a direct pack equals a pack
of the folder, and LSUN's millions of records never become files.
"""

import colorsys
import contextlib
import io
import itertools
import os
import pickle
import shutil
import tarfile

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..rng import Stream, derive_seed
from ..storage import checked_name, is_remote, partial_name, remove_stale_partials
from .reader import DECODE_ERRORS, DataError, center_crop, decode, is_image_name

CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "hexagon", "star")


@contextlib.contextmanager
def staged_output(out: str):
    """Yield a fresh folder beside ``out``; it becomes ``out`` when the block ends without an error."""
    if is_remote(out):
        raise DataError(f"--out {out}: preparation writes a local folder; copy it to the bucket afterwards")
    out = os.path.abspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise DataError(f"output {out} already exists and is not an empty folder: choose another --out or remove it")
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(parent, name)
    staging = os.path.join(parent, partial_name(name))
    os.mkdir(staging)
    try:
        yield staging
        os.replace(staging, out)  # replaces an empty ``out`` folder too
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_png(arr: np.ndarray, folder: str, name: str) -> None:
    Image.fromarray(arr).save(os.path.join(folder, name))


def write_folder(source, out: str) -> int:
    """Each image of ``source`` as a file named as the source names it; returns the count."""
    with staged_output(out) as staging:
        for index, name in enumerate(tqdm(source.names, desc=source.where, unit="img")):
            source.image(index).save(os.path.join(staging, name))
    return len(source.names)


def in_listing_order(named: list[tuple[str, object]]) -> tuple[list[str], list]:
    """Names and their items sorted as the reader lists a flat folder of those names."""
    named = sorted(named, key=lambda pair: pair[0])
    return [name for name, _ in named], [item for _, item in named]


# ---------------------------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists and strings only: a downloaded pickle must not run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_member(tar: tarfile.TarFile, src: str, name: str) -> dict:
    member = next((m for m in tar.getmembers() if m.isfile() and os.path.basename(m.name) == name), None)
    if member is None:
        raise DataError(f"{src} is not the CIFAR-10 python tarball: it has no {name}")
    try:
        # latin1: the batches were pickled by Python 2, whose byte strings hold the pixels.
        return _ArrayUnpickler(tar.extractfile(member), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"cannot read {name} in {src}: {e}") from None


def _cifar_class_names(meta, src: str) -> list[str]:
    """The label names of batches.meta, each checked before it becomes part of a file name."""
    where = f"batches.meta in {src}"
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise DataError(f"{where} has no list of label_names")
    for name in names:
        checked_name(name, where)
        if "_" in name:
            raise DataError(f"{where}: label name {name!r} contains '_', which would cut its label short")
    return names


def _cifar_batch(batch, where: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """NHWC uint8 images and labels of one batch, checked: 3072 values per row, one label in range per row."""
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: data is {got}, expected uint8 [N, 3072] (32x32 RGB rows)")
    if not isinstance(labels, list) or len(labels) != len(data):
        got = f"{len(labels)} labels" if isinstance(labels, list) else f"labels of type {type(labels).__name__}"
        raise DataError(f"{where}: {got} for {len(data)} images, expected one label per image")
    wrong = next((label for label in labels if not (isinstance(label, int) and 0 <= label < num_classes)), None)
    if wrong is not None:
        raise DataError(f"{where}: label {wrong!r} is not one of the {num_classes} classes of batches.meta")
    # Rows are 1024 red, then 1024 green, then 1024 blue values of a 32x32 image.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


class CifarSource:
    """The python-pickle tarball's images of one split, named ``<class>_<index within split>.png``."""

    def __init__(self, src: str, split: str = "train"):
        self.where = src
        try:
            tar = tarfile.open(src, "r:*")  # noqa: SIM115 (closed by the with below; opened apart for its message)
        except (OSError, tarfile.TarError) as e:
            raise DataError(f"cannot open the CIFAR-10 tarball {src}: {e}") from None
        with tar:
            class_names = _cifar_class_names(_cifar_member(tar, src, "batches.meta"), src)
            batches = [_cifar_batch(_cifar_member(tar, src, name), f"{name} in {src}", len(class_names))
                       for name in CIFAR_BATCHES[split]]
        self.images = np.concatenate([images for images, _ in batches])
        labels = [label for _, batch_labels in batches for label in batch_labels]
        self.names, self._rows = in_listing_order(
            [(f"{class_names[label]}_{row:05d}.png", row) for row, label in enumerate(labels)])

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[self._rows[index]])


# ---------------------------------------------------------------------------------------------- LSUN


def _import_lmdb():
    try:
        import lmdb
    except ImportError:
        raise DataError("reading LSUN needs the lmdb package: pip install lmdb (or idiff[lsun])") from None
    return lmdb


def lsun_square(image: Image.Image, size: int) -> np.ndarray:
    """As the original's LSUN script: BOX-resize the short side to ``size``, then center crop."""
    image = image.convert("RGB")
    scale = size / min(*image.size)
    image = image.resize(tuple(round(scale * x) for x in image.size), resample=Image.BOX)
    return center_crop(np.asarray(image), size)


def lsun_prefix(src: str) -> str:
    """The class prefix from the LMDB folder name, e.g. ``bedroom`` from ``bedroom_train_lmdb``."""
    return os.path.basename(os.path.normpath(src)).split("_", 1)[0]


class LsunSource:
    """An LSUN category LMDB (webp/jpeg values): record i as the ``<prefix>_<i:07d>.png`` square."""

    def __init__(self, src: str, image_size: int = 256, limit: int | None = None, prefix: str | None = None):
        self.where, self.image_size = src, image_size
        prefix = checked_name(prefix, "--prefix") if prefix else checked_name(lsun_prefix(src),
                                                                              f"the folder name of {src}")
        if "_" in prefix:
            raise DataError(f"prefix {prefix!r} contains '_': the label is what comes before the first '_'")
        with self._open() as env, env.begin() as txn:
            total = env.stat()["entries"] if limit is None else min(limit, env.stat()["entries"])
            keys = list(itertools.islice(txn.cursor().iternext(values=False), total))
        self.names, self._keys = in_listing_order([(f"{prefix}_{i:07d}.png", key) for i, key in enumerate(keys)])
        self._txn = None  # opened by the process that reads records

    def _open(self):
        lmdb = _import_lmdb()
        try:
            return lmdb.open(self.where, readonly=True, lock=False, readahead=False, subdir=os.path.isdir(self.where))
        except lmdb.Error as e:
            raise DataError(f"cannot open the LMDB {self.where}: {e}") from None

    def image(self, index: int) -> Image.Image:
        if self._txn is None:
            self._txn = self._open().begin()
        key = self._keys[index]
        try:
            image = Image.open(io.BytesIO(self._txn.get(key)))
            image.load()
        except DECODE_ERRORS as e:
            raise DataError(f"cannot decode record {key!r} of {self.where}: {e}") from None
        return Image.fromarray(lsun_square(image, self.image_size))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_txn": None}  # each pack worker opens the LMDB itself


# ---------------------------------------------------------------------------------------------- ImageNet


def imagenet_plan(src: str) -> list[tuple[str, str]]:
    """(source file, output name) for each image of a one-folder-per-synset tree."""
    try:
        synsets = sorted(entry.name for entry in os.scandir(src) if entry.is_dir())
    except OSError as e:
        raise DataError(f"cannot list {src}: {e}") from None
    if not synsets:
        raise DataError(f"{src} has no class folders: expected one folder per synset, e.g. {src}/n01440764")
    plan = []
    for synset in synsets:
        checked_name(synset, f"class folder in {src}")
        if "_" in synset:
            raise DataError(f"class folder {synset!r} in {src} contains '_', which would cut its label short")
        folder = os.path.join(src, synset)
        for name in sorted(os.listdir(folder)):
            if is_image_name(name):
                checked_name(name, folder)
                # Train files are already named n01440764_10026.JPEG; others get the synset in front.
                plan.append((os.path.join(folder, name), name if name.startswith(f"{synset}_") else f"{synset}_{name}"))
    if not plan:
        raise DataError(f"no images in the class folders of {src}")
    return plan


class ImagenetSource:
    """The images of one folder per synset under their flat, label-prefixed names (for packing)."""

    def __init__(self, src: str):
        self.where = src
        self.names, self._paths = in_listing_order([(name, path) for path, name in imagenet_plan(src)])

    def image(self, index: int) -> Image.Image:
        return decode(self._paths[index])


def imagenet(src: str, out: str, mode: str = "link") -> int:
    """Synset folders as one flat folder of label-prefixed files, symlinked or copied; returns the count."""
    if mode not in ("link", "copy"):
        raise ValueError(f"mode must be 'link' or 'copy', got {mode!r}")
    plan = imagenet_plan(src)
    with staged_output(out) as staging:
        for source, name in tqdm(plan, desc=mode, unit="img"):
            target = os.path.join(staging, name)
            if mode == "link":
                os.symlink(os.path.abspath(source), target)
            else:
                shutil.copyfile(source, target)
    return len(plan)


# ---------------------------------------------------------------------------------------------- synthetic


def _unit_outline(shape: str) -> np.ndarray:
    """Corners [k, 2] of a polygonal shape with outer radius 1 (circle and ring are ellipses)."""
    if shape == "cross":
        a = 0.3  # half the arm width
        return np.array([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
                         (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)])
    # Square and diamond differ by 45 degrees; triangle and star point up.
    corners, start = {"square": (4, np.pi / 4), "diamond": (4, 0.0), "triangle": (3, -np.pi / 2),
                      "hexagon": (6, 0.0), "star": (10, -np.pi / 2)}[shape]
    angles = start + 2 * np.pi * np.arange(corners) / corners
    radii = np.where((shape == "star") & (np.arange(corners) % 2 == 1), 0.45, 1.0)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A centred shape of random colour, slightly moved, scaled and turned, on a dark background.

    Returns uint8 [size, size, 3].
    """
    scale = 4  # supersampling, so that the BOX reduction gives smooth edges
    side = size * scale
    background = tuple(int(v) for v in rng.integers(10, 40, 3))
    hue, saturation, value = rng.uniform(), rng.uniform(0.6, 0.9), rng.uniform(0.8, 1)
    colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    centre = side / 2 + rng.uniform(-0.05, 0.05, 2) * side
    r = side * rng.uniform(0.28, 0.38)
    box = (*(centre - r), *(centre + r))
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=round(0.3 * r))
    else:
        turn = rng.uniform(-0.15, 0.15)  # small enough that squares never pass for diamonds
        rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
        corners = centre + r * _unit_outline(shape) @ rotation.T
        draw.polygon([tuple(corner) for corner in corners], fill=colour)
    return np.asarray(canvas.resize((size, size), resample=Image.BOX))


def synthetic(out: str, n: int = 512, image_size: int = 32, classes: int = 4, seed: int = 0) -> int:
    """``n`` images ``<shape>_<index>.png``, class ``index % classes``; the same bytes for the same seed."""
    if not 1 <= classes <= len(SHAPES):
        raise DataError(f"--classes must be between 1 and {len(SHAPES)} (one shape each: {', '.join(SHAPES)})")
    if image_size < 8 or n < 1:
        raise DataError(f"need --n >= 1 and --image-size >= 8, got {n} and {image_size}")
    width = max(5, len(str(n - 1)))
    with staged_output(out) as staging:
        for index in tqdm(range(n), desc="synthetic", unit="img"):
            shape = SHAPES[index % classes]
            rng = np.random.default_rng(derive_seed(seed, Stream.SYNTHETIC, index))
            save_png(draw_shape(shape, image_size, rng), staging, f"{shape}_{index:0{width}d}.png")
    return n
