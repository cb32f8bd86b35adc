"""FID, sFID, IS and precision/recall of generated images against a reference, with the protocol of each score.

Inception runs once over the samples (all seed sets together) and, unless its statistics are in a file or
the cache, once over the reference. The formulas are torch-fidelity's: FID and sFID through the eigenvalues
of sigma_1 sigma_2, IS over 10 splits of the unbiased logits, precision/recall with the 3rd neighbour.
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .cache import ReferenceCache
from .images import ImageSource, find_images, load_images
from .inception import Inception, InceptionWeights, inception_weights
from .protocol import SampleRun, protocol, sample_run_of
from .reference import Reference, check_resolution, find_reference, reference_features
from .statistics import Moments, frechet_distance

FIDELITY_METRICS = ("fid", "sfid", "inception_score", "precision_recall")
PRC_NEIGHBORHOOD = 3
# Fewer images than this leave a metric undefined: a covariance needs 2, the k-th neighbour k + 1.
MIN_IMAGES = {"fid": 2, "sfid": 2, "inception_score": 1, "precision_recall": PRC_NEIGHBORHOOD + 1}


@dataclass(frozen=True)
class FidelityInputs:
    samples: ImageSource
    reference: Reference
    size: tuple[int, int]
    weights: InceptionWeights
    run: SampleRun  # the sample run that drew them: seeds, seed sets, sampler

    @property
    def set_size(self) -> int:
        return self.samples.count // self.run.seed_sets


def fidelity_inputs(samples, reference, metrics, weights_file) -> FidelityInputs:
    """The two image sets or statistics (checked; images not loaded yet) and the weights of an evaluation."""
    generated = find_images(samples, "evaluate.samples")
    real = find_reference(reference)
    size = generated.size or real.resolution
    if size is None:
        raise UserError("evaluate.samples and evaluate.reference are both image folders (or statistics of unknown "
                        "resolution): one of them must be an .npz, which gives the resolution to compare at")
    check_resolution(real, generated.size)
    run = sample_run_of(generated)
    for metric in metrics:
        _check_reference_has(real, metric)
        sets = [(generated, generated.count // run.seed_sets)]
        if real.statistics is None or (metric == "precision_recall" and real.images is not None):
            sets.append((real.images, real.images.count))
        for images, count in sets:
            if count < MIN_IMAGES[metric]:
                raise UserError(f"{metric} needs at least {MIN_IMAGES[metric]} images, but {images.what} "
                                f"({images.path}) has {count}" + (" per seed set" if images is generated and
                                                                   run.seed_sets > 1 else ""))
    return FidelityInputs(generated, real, size, inception_weights(weights_file), run)


def _check_reference_has(reference: Reference, metric: str) -> None:
    stats = reference.statistics
    if stats is None:
        return
    if metric == "sfid" and stats.spatial is None:
        raise UserError(f"sfid needs mu_s and sigma_s, which evaluate.reference ({reference.path}) does not hold")
    if metric == "precision_recall" and not stats.has_images:
        raise UserError(f"precision_recall needs reference images (arr_0), which evaluate.reference "
                        f"({reference.path}) does not hold")


def fidelity_metrics(inputs: FidelityInputs, metrics, device, cache: ReferenceCache | None = None) -> dict:
    """``{metric: {...numbers, num_samples, num_reference}, "protocol": {...}}`` for ``metrics``.

    With several seed sets, a metric's numbers are the mean over the sets, and ``seed_sets`` holds each set's
    numbers, their mean, standard deviation and minimum."""
    inception = Inception(inputs.weights, device)
    ref = reference_features(inputs.reference, inputs.size, inception, inputs.weights.sha256,
                             "precision_recall" in metrics, cache or ReferenceCache())
    features = inception.features(load_images(inputs.samples, inputs.size), "samples")
    n = inputs.set_size
    per_set = [_scores({k: v[i * n:(i + 1) * n] for k, v in features.items()}, ref, metrics)
               for i in range(inputs.run.seed_sets)]
    num_reference = inputs.reference.images.count if inputs.reference.statistics is None else None
    results = {}
    for metric in metrics:
        results[metric] = {**_combined([scores[metric] for scores in per_set], n), "num_samples": n,
                           "num_reference": num_reference}
    results["protocol"] = protocol(samples=inputs.samples, set_size=n, run=inputs.run, reference=inputs.reference,
                                   features=ref, weights_sha256=inputs.weights.sha256,
                                   resolution=inputs.reference.resolution)
    return results


def _scores(features, ref, metrics) -> dict:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_prc import (
        KEY_METRIC_F_SCORE,
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    out = {}
    if "fid" in metrics:
        out["fid"] = {"fid": frechet_distance(Moments.of(features["pool"]), ref.pool)}
    if "sfid" in metrics:
        out["sfid"] = {"sfid": frechet_distance(Moments.of(features["spatial"]), ref.spatial)}
    if "inception_score" in metrics:
        logits = torch.from_numpy(features["logits"])
        isc = isc_features_to_metric(logits, splits=min(10, len(logits)), shuffle=True, rng_seed=2020)
        out["inception_score"] = {"mean": isc[KEY_METRIC_ISC_MEAN], "std": isc[KEY_METRIC_ISC_STD]}
    if "precision_recall" in metrics:
        # Blocked k-NN distances (save_cpu_ram): the full matrix of 50,000 images would take 10 GB.
        prc = prc_features_to_metric(torch.from_numpy(features["pool"]), torch.from_numpy(ref.pr_features),
                                     prc_neighborhood=PRC_NEIGHBORHOOD, prc_batch_size=10000, save_cpu_ram=True,
                                     verbose=False)
        out["precision_recall"] = {"precision": prc[KEY_METRIC_PRECISION], "recall": prc[KEY_METRIC_RECALL],
                                   "f_score": prc[KEY_METRIC_F_SCORE], "neighborhood": PRC_NEIGHBORHOOD}
    return out


def _combined(sets: list[dict], set_size: int) -> dict:
    """One set's numbers as they are; several sets' means, with each set's numbers, std and minimum."""
    if len(sets) == 1:
        return dict(sets[0])
    numbers = [k for k, v in sets[0].items() if isinstance(v, float)]
    summary = {k: float(np.mean([s[k] for s in sets])) for k in numbers}
    return {**sets[0], **summary, "seed_sets": {
        "per_set": [{**s, "indices": [i * set_size, (i + 1) * set_size]} for i, s in enumerate(sets)],
        "mean": summary,
        "std": {k: float(np.std([s[k] for s in sets], ddof=1)) for k in numbers},
        "min": {k: float(np.min([s[k] for s in sets])) for k in numbers},
        "note": f"the numbers above are the mean over {len(sets)} disjoint seed sets; 'min' is the minimum over "
                "them (what some papers report), not a mean"}}
