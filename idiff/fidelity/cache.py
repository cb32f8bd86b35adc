"""The cache of reference statistics computed from images.

Where: ``$IDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/idiff``, else ``~/.cache/idiff``; entries are in its
``reference-statistics/`` folder, one .npz per (images' sha256, resolution), in the layout of a statistics
file plus ``pr_features`` (the pool features of the precision/recall images) and ``inception_sha256``. An entry
made with other Inception weights is recomputed and replaced, with a warning. Deleting the folder is safe.
"""

import os

import numpy as np

from .. import storage
from ..errors import UserError
from ..shards import read_npz
from .statistics import warn, write_npz

FOLDER = "reference-statistics"


def default_cache_dir() -> str:
    configured = os.environ.get("IDIFF_CACHE_DIR")
    if configured:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "idiff")


class ReferenceCache:
    def __init__(self, root: str | None = None):
        self.folder = storage.join(root or default_cache_dir(), FOLDER)

    def path(self, key) -> str:
        sha, (height, width) = key
        return storage.join(self.folder, f"{sha}-{height}x{width}.npz")

    def load(self, key, weights_sha256: str) -> dict[str, np.ndarray] | None:
        """The entry of ``key`` made with these weights; None when there is none (or it is unreadable)."""
        path = self.path(key)
        if not storage.exists(path):
            return None
        try:
            entry = read_npz(path)
        except UserError as err:
            warn(f"reference statistics cache: ignoring {path}: {err}")
            return None
        made_with = str(entry.get("inception_sha256", "unknown"))
        if made_with != weights_sha256:
            warn(f"reference statistics cache: {path} was made with Inception weights sha256 {made_with[:12]}..., "
                 f"these are {weights_sha256[:12]}...; recomputing them")
            return None
        return entry

    def store(self, key, weights_sha256: str, entry: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Keeps ``entry`` (a cache that cannot be written is a warning, not an error); returns it."""
        try:
            storage.makedirs(self.folder)
            write_npz(self.path(key), {**entry, "inception_sha256": np.asarray(weights_sha256)})
        except OSError as err:
            warn(f"reference statistics cache: cannot write {self.folder} ({err}); set IDIFF_CACHE_DIR")
        return entry
