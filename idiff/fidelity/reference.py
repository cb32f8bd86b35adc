"""The reference of an evaluation: real images (a folder or an .npz batch) or a statistics file.

A reference given as images has its statistics computed once and kept in the cache (``cache.py``), keyed by
the images' sha256 and the resolution they are compared at; the entry records the Inception weights' sha256,
and an entry made with other weights is recomputed, with a warning. Precision/recall compares with at most
``PR_IMAGES`` reference images, as guided-diffusion's reference batches hold: a seeded subset of a larger set,
so that a folder sorted by class still gives every class.
"""

from dataclasses import dataclass

import numpy as np

from .. import storage
from ..errors import UserError
from ..shards import npz_headers
from .cache import ReferenceCache
from .images import ImageSource, content_sha256, find_images, images_in_npz, load_images
from .statistics import Moments, StatisticsFile, is_statistics_file, read_statistics_file, warn

PR_IMAGES = 10_000
PR_SUBSET_SEED = 0


@dataclass(frozen=True)
class Reference:
    path: str
    kind: str  # "statistics", "images-npz" or "images-folder"
    images: ImageSource | None  # the images to run Inception on: the reference's, or a statistics file's arr_0
    statistics: StatisticsFile | None

    @property
    def resolution(self) -> tuple[int, int] | None:
        return self.statistics.resolution if self.statistics else self.images.size


def find_reference(path, what: str = "evaluate.reference") -> Reference:
    """A folder or .npz of images, or a statistics file; checked (a statistics file entirely), images not loaded."""
    path = str(path)
    if storage.isdir(path) or not path.endswith(".npz") or not storage.exists(path):
        images = find_images(path, what)
        return Reference(images.path, images.kind, images, None)
    headers = npz_headers(path)
    if not is_statistics_file(headers):
        return Reference(path, "images-npz", images_in_npz(path, what, headers), None)
    stats = read_statistics_file(path, what, headers)
    images = ImageSource(path, f"{what} arr_0", headers["arr_0"].shape[0], stats.resolution) \
        if stats.has_images else None
    return Reference(path, "statistics", images, stats)


def pr_subset(count: int) -> np.ndarray:
    """Indices of the reference images precision/recall compares with: all, or a seeded subset of PR_IMAGES."""
    if count <= PR_IMAGES:
        return np.arange(count)
    return np.sort(np.random.default_rng(PR_SUBSET_SEED).choice(count, PR_IMAGES, replace=False))


@dataclass(frozen=True)
class ReferenceFeatures:
    pool: Moments
    spatial: Moments | None
    pr_features: np.ndarray | None  # pool features of the precision/recall images
    sha256: str  # of the file or folder
    source: str  # where the statistics came from: "file", "computed" or "cache"


def reference_features(reference: Reference, size, inception, weights_sha256: str, need_pr: bool,
                       cache: ReferenceCache) -> ReferenceFeatures:
    """What the scores need from the reference, reading the cache or running Inception (and filling the cache)."""
    source = reference.images
    sha = content_sha256(source) if source else storage.file_digest(reference.path)["sha256"]
    stats = reference.statistics
    if stats is not None and not (need_pr and source):
        return ReferenceFeatures(stats.pool, stats.spatial, None, sha, "file")
    key = (sha, tuple(size))
    entry = cache.load(key, weights_sha256)
    if entry is None:
        entry = _compute(source, size, inception, with_moments=stats is None)
        entry = cache.store(key, weights_sha256, entry)
        origin = "computed"
    else:
        origin = "cache"
    if stats is not None:  # the statistics are the file's; only arr_0's features came from Inception
        return ReferenceFeatures(stats.pool, stats.spatial, entry["pr_features"], sha, "file")
    return ReferenceFeatures(Moments(entry["mu"], entry["sigma"]), Moments(entry["mu_s"], entry["sigma_s"]),
                             entry["pr_features"], sha, origin)


def _compute(source: ImageSource, size, inception, with_moments: bool) -> dict[str, np.ndarray]:
    images = load_images(source, size)
    features = inception.features(images, "reference")
    entry = {"pr_features": features["pool"][pr_subset(len(images))]}
    if with_moments:
        pool, spatial = Moments.of(features["pool"]), Moments.of(features["spatial"])
        entry.update(mu=pool.mu, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    return entry


def check_resolution(reference: Reference, samples_size, what="evaluate.reference") -> None:
    """Refuses a reference of another resolution than the samples; warns where it cannot be known."""
    got = reference.resolution
    if got is None:
        warn(f"{what}: {reference.path} holds statistics without images or a recorded resolution (as "
             f"guided-diffusion's do): make sure they describe {samples_size[0]}x{samples_size[1]} images")
    elif samples_size is not None and tuple(got) != tuple(samples_size):
        raise UserError("{} is {}x{} but the samples are {}x{} ({}); use a reference of the samples' "
                        "resolution".format(what, *got, *samples_size, reference.path))
