"""Inception-v3 features through torch-fidelity's port of the TF 2015-12-05 graph (pt_inception-2015-12-05).

One pass over a batch gives what every Inception metric needs: the 2048 pool features (``pool_3`` in the TF
graph: FID, precision/recall), the unbiased logits (IS), and the spatial features of guided-diffusion's sFID:
the first 7 channels of ``mixed_6/conv`` (17 x 17 x 7 = 2023 numbers, flattened in TF's NHWC order).
torch-fidelity does not list the spatial layer among its features, but its module keeps the TF graph's
structure: ``mixed_6`` is the fourth 17 x 17 block (mixed_3 = Mixed_6a ... mixed_6 = Mixed_6d) and its
``conv`` is that block's 1x1 branch, read here with a forward hook.
"""

import os
import pickle
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from .. import storage
from ..errors import UserError
from ..progress import Progress

NETWORK = "inception-v3-compat"
POOL_LAYER, LOGITS_LAYER = "2048", "logits_unbiased"
SPATIAL_CHANNELS = 7
LAYERS = {"pool": "pool_3 (2048)", "spatial": f"mixed_6/conv[..., :{SPATIAL_CHANNELS}] (2023)",
          "logits": "logits_unbiased (1008)"}
# torch-fidelity's bilinear resize reproduces TF1's (no antialiasing), which the 2015 graph used.
INPUT_PATH = "uint8 -> bilinear resize to 299x299 as TF1 (no antialias, torch-fidelity) -> (x - 128) / 128"
BATCH = 64


@dataclass(frozen=True)
class InceptionWeights:
    path: str
    state: dict  # plain tensors, checked
    sha256: str


def inception_weights(configured: str | None) -> InceptionWeights:
    path = weights_file(configured)
    return InceptionWeights(path, _trusted_state_dict(path), storage.file_digest(path)["sha256"])


def weights_file(configured: str | None) -> str:
    """The path of the Inception weights (configured, else torch-fidelity's download cache); it must exist."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = configured or os.path.join(cache, os.path.basename(URL_INCEPTION_V3))
    if not storage.exists(path):
        raise UserError(
            f"Inception weights not found at {path}. Cluster nodes are often offline: download {URL_INCEPTION_V3} "
            f"on a machine with internet and set evaluate.inception_weights to its path (or put it in {cache}/)."
        )
    return path


def _trusted_state_dict(path) -> dict:
    """The weights as plain tensors: loading refuses pickled code, since checkpoints are untrusted input."""
    try:
        state = storage.load_torch(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise UserError(f"evaluate.inception_weights: {path} is not a plain state dict of tensors ({err})") from None
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"evaluate.inception_weights: {path} is not a state dict of tensors")
    return state


class Inception:
    """torch-fidelity's network with the weights given; ``features`` runs it over uint8 NHWC images."""

    def __init__(self, weights: InceptionWeights, device):
        from torch_fidelity.utils import create_feature_extractor

        self.device = torch.device(device)
        with tempfile.TemporaryDirectory() as tmp:
            # torch-fidelity unpickles with weights_only=False: give it a file we wrote from plain tensors.
            trusted = os.path.join(tmp, "inception.pth")
            torch.save(weights.state, trusted)
            self.network = create_feature_extractor(NETWORK, [POOL_LAYER, LOGITS_LAYER],
                                                    cuda=self.device.type == "cuda",
                                                    feature_extractor_weights_path=trusted, verbose=False)
        self._spatial = []
        self.network.Mixed_6d.branch1x1.register_forward_hook(
            lambda module, inputs, output: self._spatial.append(output[:, :SPATIAL_CHANNELS]))

    def features(self, images: np.ndarray, what: str = "images") -> dict[str, np.ndarray]:
        """{"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]} float32 (as computed; 50,000 samples
        take 1 GB), of uint8 NHWC ``images``; progress on ``what`` (minutes on a CPU) goes to stderr."""
        out = {"pool": [], "spatial": [], "logits": []}
        progress = Progress(len(images), desc=f"inception {what}", unit="img")
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                batch = torch.from_numpy(np.ascontiguousarray(images[start:start + BATCH])).permute(0, 3, 1, 2)
                self._spatial.clear()
                pool, logits = self.network(batch.to(self.device))
                spatial = self._spatial[0].permute(0, 2, 3, 1).flatten(1)  # NHWC order, as TF's
                for name, value in (("pool", pool), ("spatial", spatial), ("logits", logits)):
                    out[name].append(value.float().cpu().numpy())
                progress.update(len(batch))
        progress.close()
        return {name: np.concatenate(values) for name, values in out.items()}
