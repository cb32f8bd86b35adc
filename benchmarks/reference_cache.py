"""What the reference-statistics cache saves: an evaluation against images, the first time and the second.

    python -m benchmarks.reference_cache [--reference 512] [--samples 256] [--inception-weights FILE]

32x32 images (random, CIFAR-sized); without a weights file Inception is randomly initialised, which costs the
same time. Prints the seconds of both evaluations and the Inception throughput, from which the saving of a
real protocol follows: the second evaluation skips the reference's passes (50,000 images for CIFAR-10's).
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from idiff.fidelity import fidelity_inputs, fidelity_metrics
from idiff.fidelity.cache import ReferenceCache


def random_inception_weights(folder: str) -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    empty = os.path.join(folder, "empty.pth")
    torch.save({}, empty)
    path = os.path.join(folder, "inception.pth")
    torch.save(Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty).state_dict(), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=int, default=512)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--inception-weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, count in (("reference", args.reference), ("samples", args.samples)):
            np.savez(os.path.join(tmp, f"{name}.npz"), arr_0=rng.integers(0, 256, (count, 32, 32, 3), np.uint8))
        weights = args.inception_weights or random_inception_weights(tmp)
        metrics = ["fid", "inception_score", "precision_recall"]
        cache = ReferenceCache(os.path.join(tmp, "cache"))
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            inputs = fidelity_inputs(os.path.join(tmp, "samples.npz"), os.path.join(tmp, "reference.npz"), metrics,
                                     weights)
            source = fidelity_metrics(inputs, metrics, args.device, cache)["protocol"]["reference"]["statistics"]
            seconds.append(time.perf_counter() - start)
            print(f"{source:>8}: {seconds[-1]:.1f} s")
    images_per_s = (args.reference + args.samples) / seconds[0]
    print(f"{args.reference} reference and {args.samples} sample images on {args.device}, "
          f"{torch.get_num_threads()} threads: the second evaluation takes {seconds[1] / seconds[0]:.2f}x the first "
          f"({seconds[0] - seconds[1]:.1f} s saved); Inception ~{images_per_s:.0f} img/s, so 50,000 reference "
          f"images cost ~{50000 / images_per_s / 60:.0f} min each time without the cache")


if __name__ == "__main__":
    main()
