"""Feature statistics in the layout of guided-diffusion's evaluator reference batches, and Frechet distances.

A statistics file is an .npz holding ``mu`` [2048] and ``sigma`` [2048, 2048] of the Inception pool features,
optionally ``mu_s`` / ``sigma_s`` of the spatial features (sFID) and ``arr_0``, uint8 images [N, H, W, 3] for
precision/recall. Files idiff writes add ``resolution`` ([H, W] of the images the statistics describe),
``num_images`` and ``inception_sha256``, which guided-diffusion's evaluator ignores.
"""

import hashlib
import io
import sys
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..errors import UserError
from ..shards import npz_headers, read_npz

DIMS = {"mu": 2048, "mu_s": 2023}  # pool_3, and 7 channels of mixed_6/conv at 17 x 17
COVARIANCE_OF = {"mu": "sigma", "mu_s": "sigma_s"}
SYMMETRY_TOLERANCE = 1e-6  # relative to the largest entry: np.cov is symmetric to rounding


@dataclass(frozen=True)
class Moments:
    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> "Moments":
        features = features.astype(np.float64)
        return cls(features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False)))

    def sha256(self) -> str:
        data = self.mu.astype(np.float64).tobytes() + self.sigma.astype(np.float64).tobytes()
        return hashlib.sha256(data).hexdigest()


def frechet_distance(a: Moments, b: Moments) -> float:
    """torch-fidelity's FID formula (the trace of sqrt(sigma_a sigma_b) through eigenvalues), in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def stats(m):
        return {"mu": m.mu.astype(np.float64), "sigma": m.sigma.astype(np.float64)}

    return fid_statistics_to_metric(stats(a), stats(b), verbose=False)[KEY_METRIC_FID]


@dataclass(frozen=True)
class StatisticsFile:
    """A checked statistics file: ``pool`` (mu, sigma), ``spatial`` (mu_s, sigma_s) when it holds them."""

    path: str
    pool: Moments
    spatial: Moments | None
    resolution: tuple[int, int] | None  # of arr_0, else the recorded one; None: unknown (guided-diffusion's)
    has_images: bool
    inception_sha256: str | None


def is_statistics_file(headers) -> bool:
    return "mu" in headers or "sigma" in headers


def read_statistics_file(path, what: str, headers=None) -> StatisticsFile:
    """Every array checked (shapes, finite, symmetric covariances): a bad file is a UserError naming it and the key."""
    headers = headers if headers is not None else npz_headers(path)
    for key in ("mu", "sigma"):
        if key not in headers:
            raise UserError(f"{what}: {path} has no {key}: a statistics file holds mu and sigma of the pool "
                            f"features (keys found: {', '.join(sorted(headers)) or 'none'})")
    if ("mu_s" in headers) != ("sigma_s" in headers):
        raise UserError(f"{what}: {path} has {'mu_s' if 'mu_s' in headers else 'sigma_s'} without "
                        f"{'sigma_s' if 'mu_s' in headers else 'mu_s'}")
    for mean, dim in DIMS.items():
        cov = COVARIANCE_OF[mean]
        if mean not in headers:
            continue
        if tuple(headers[mean].shape) != (dim,):
            raise UserError(f"{what}: {path}: {mean} has shape {list(headers[mean].shape)}, expected [{dim}]")
        if tuple(headers[cov].shape) != (dim, dim):
            raise UserError(f"{what}: {path}: {cov} has shape {list(headers[cov].shape)}, expected [{dim}, {dim}]")
        for key in (mean, cov):
            if headers[key].dtype.kind != "f":
                raise UserError(f"{what}: {path}: {key} is {headers[key].dtype}, expected floating point numbers")
    arrays = read_npz(path, ["mu", "sigma", "mu_s", "sigma_s", "resolution", "inception_sha256"])
    for mean in DIMS:
        if mean not in arrays:
            continue
        cov = arrays[COVARIANCE_OF[mean]]
        for key, value in ((mean, arrays[mean]), (COVARIANCE_OF[mean], cov)):
            if not np.isfinite(value).all():
                raise UserError(f"{what}: {path}: {key} holds non-finite numbers (nan or inf)")
        asymmetry = np.abs(cov - cov.T).max()
        if asymmetry > SYMMETRY_TOLERANCE * max(np.abs(cov).max(), 1e-30):
            raise UserError(f"{what}: {path}: {COVARIANCE_OF[mean]} is not symmetric (largest |sigma - sigma^T| "
                            f"{asymmetry:.3g}): not a covariance matrix")
    images = headers.get("arr_0")
    if images is not None and (images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[-1] != 3):
        raise UserError(f"{what}: {path}: arr_0 is {images.dtype} {list(images.shape)}, expected uint8 images "
                        f"[N, H, W, 3] (the batch for precision/recall)")
    resolution = tuple(images.shape[1:3]) if images is not None else None
    if resolution is None and "resolution" in arrays:
        resolution = _recorded_resolution(arrays["resolution"], path, what)
    spatial = Moments(arrays["mu_s"], arrays["sigma_s"]) if "mu_s" in arrays else None
    sha = str(arrays["inception_sha256"]) if "inception_sha256" in arrays else None
    return StatisticsFile(str(path), Moments(arrays["mu"], arrays["sigma"]), spatial, resolution,
                          images is not None, sha)


def _recorded_resolution(value, path, what) -> tuple[int, int]:
    if value.shape != (2,) or value.dtype.kind not in "iu" or (value <= 0).any():
        raise UserError(f"{what}: {path}: resolution is {value.dtype} {value.tolist()}, expected [height, width]")
    return int(value[0]), int(value[1])


def statistics_arrays(pool: Moments, spatial: Moments | None, resolution, num_images: int,
                      inception_sha256: str) -> dict[str, np.ndarray]:
    """The arrays of a statistics file that idiff writes (without arr_0)."""
    arrays = {"mu": pool.mu, "sigma": pool.sigma}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    return {**arrays, "resolution": np.asarray(resolution, dtype=np.int64),
            "num_images": np.asarray(num_images, dtype=np.int64), "inception_sha256": np.asarray(inception_sha256)}


def write_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically: a file is whole or absent."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.atomic_write_bytes(path, buffer.getvalue())


def warn(message: str) -> None:
    print(f"idiff: warning: {message}", file=sys.stderr, flush=True)
