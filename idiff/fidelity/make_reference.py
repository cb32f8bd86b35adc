"""``idiff evaluate --make-reference SRC --out REF.npz``: a statistics file of real images, in the layout of
guided-diffusion's evaluator reference batches (mu, sigma, mu_s, sigma_s, and arr_0 for precision/recall),
plus idiff's resolution, num_images and inception_sha256. It goes through the reference cache, so making it
from images an evaluation already used runs no Inception pass, and evaluating against those images later
neither.
"""

import os
import sys

from .. import storage
from ..errors import UserError
from .cache import ReferenceCache
from .images import load_images
from .inception import Inception, inception_weights
from .reference import find_reference, pr_subset, reference_features
from .statistics import statistics_arrays, write_npz


def make_reference(src: str, out: str, weights_file: str | None, resolution: int | None, device: str) -> None:
    """Writes the statistics of the images ``src`` (a folder or an .npz) to ``out``."""
    if not out.endswith(".npz"):
        raise UserError(f"--out {out}: a statistics file is an .npz")
    reference = find_reference(src, "--make-reference")
    if reference.statistics is not None:
        raise UserError(f"--make-reference: {src} is a statistics file already; give the images it describes")
    images = reference.images
    if images.is_npz and resolution and (resolution, resolution) != images.size:
        raise UserError("--resolution {}: {} holds {}x{} images".format(resolution, src, *images.size))
    size = images.size or ((resolution, resolution) if resolution else None)
    if size is None:
        raise UserError(f"--make-reference: {src} is a folder; give the --resolution to resize its images to")
    if images.count < 2:
        raise UserError(f"--make-reference: {src} has {images.count} image(s); a covariance needs at least 2")
    weights = inception_weights(weights_file)
    features = reference_features(reference, size, Inception(weights, device), weights.sha256, need_pr=True,
                                  cache=ReferenceCache())
    kept = load_images(images, size)[pr_subset(images.count)]
    arrays = {**statistics_arrays(features.pool, features.spatial, size, images.count, weights.sha256), "arr_0": kept}
    storage.makedirs(os.path.dirname(out) or ".")
    write_npz(out, arrays)
    print(f"idiff: wrote {out}: statistics of {images.count} {size[0]}x{size[1]} images ({features.source}), "
          f"{len(kept)} of them kept as arr_0 for precision/recall", file=sys.stderr)
