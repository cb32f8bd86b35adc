"""How a score was obtained, recorded beside it: a score is only comparable with one of the same protocol.

``COMPARABILITY`` lists the fields that decide it: the number of samples per score, the reference statistics
(their sha256, so a statistics file and the images it was made from are the same reference), the Inception
weights, the feature layer, and how samples become Inception's input. The rest (seeds, the sampler, where the
statistics came from, torch-fidelity's version) is what a comparison is usually about, or does not change
the numbers, and is shown without deciding.
"""

import os
from dataclasses import dataclass

from .. import storage
from ..errors import UserError
from ..jobspec.load import parse_spec
from ..jobspec.schema import DiffusionSection
from ..run_dir import RunDir
from .images import ImageSource
from .inception import INPUT_PATH, LAYERS, NETWORK

COMPARABILITY = ("num_samples", "reference.statistics_sha256", "inception.weights_sha256", "feature_layer",
                 "preprocessing.samples", "preprocessing.inception_input")


@dataclass(frozen=True)
class SampleRun:
    """What the sample run that drew the images says about them (nothing for an .npz of unknown origin)."""

    seed: int | None
    seed_sets: int
    sampling: dict | None


def sample_run_of(samples: ImageSource) -> SampleRun:
    """The sample run whose collected .npz ``samples`` is (its spec.yaml beside the file), if any."""
    folder = samples.path if not samples.is_npz else os.path.dirname(samples.path)
    run = RunDir(folder)
    data = run.saved_spec() if samples.is_npz else None
    if not data or data.get("kind") != "sample" or not isinstance(data.get("sample"), dict):
        return SampleRun(None, 1, None)
    if data["sample"].get("sampler") is not None:
        # spec.yaml writes every default, and use_ddim: false beside sampler: ddim reads back as a contradiction
        data = {**data, "sample": {k: v for k, v in data["sample"].items() if k != "use_ddim"}}
    job = parse_spec({**data, "run_dir": folder}, source=run.spec_file)
    s = job.sample
    if samples.count != s.num_samples * s.seed_sets:
        raise UserError(f"evaluate.samples: {samples.path} holds {samples.count} images, but its run's spec draws "
                        f"{s.seed_sets} seed set(s) of {s.num_samples}")
    return SampleRun(s.seed, s.seed_sets, _sampling(job))


def _sampling(job) -> dict:
    s = job.sample
    diffusion = job.diffusion
    if diffusion is None and s.from_run:  # the training run's own schedule
        trained = RunDir(s.from_run).saved_job() if storage.exists(RunDir(s.from_run).spec_file) else None
        diffusion = trained.diffusion if trained is not None else None
    elif diffusion is None:  # a released checkpoint's, with the defaults it was loaded with
        diffusion = DiffusionSection()
    options = s.sampler_options
    return {"sampler": s.sampler_name, "steps": s.steps, "timestep_respacing": s.timestep_respacing or None,
            "spacing": options.get("spacing"), "eta": options.get("eta"), "clip_denoised": s.clip_denoised,
            "precision": s.precision, "described": s.sampling,
            "noise_schedule": diffusion.noise_schedule if diffusion else None,
            "diffusion_steps": diffusion.diffusion_steps if diffusion else None,
            "weights": s.model_path or f"{s.from_run} checkpoint {s.checkpoint} (use_ema {s.use_ema})"}


def protocol(*, samples: ImageSource, set_size: int, run: SampleRun, reference, features, weights_sha256: str,
             resolution) -> dict:
    """The protocol of scores over sets of ``set_size`` samples of ``samples`` against ``reference``."""
    import torch_fidelity

    seeds = None if run.seed is None else {"seed": run.seed, "indices": [0, set_size * run.seed_sets],
                                           "seed_sets": run.seed_sets}
    return {
        "num_samples": set_size,
        "seeds": seeds,
        "reference": {"kind": reference.kind, "path": reference.path, "sha256": features.sha256,
                      "statistics": features.source, "statistics_sha256": features.pool.sha256(),
                      "resolution": list(resolution) if resolution else None,
                      "precision_recall_images": None if features.pr_features is None else len(features.pr_features)},
        "inception": {"network": NETWORK, "weights_sha256": weights_sha256},
        "feature_layer": LAYERS["pool"],
        "layers": dict(LAYERS),
        "preprocessing": {"samples": samples.preprocessing, "inception_input": INPUT_PATH},
        "torch_fidelity": torch_fidelity.__version__,
        "sampling": run.sampling,
    }


def field(protocol_dict: dict | None, dotted: str):
    value = protocol_dict or {}
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def differences(a: dict | None, b: dict | None) -> list[str]:
    """The deciding fields in which two protocols differ; a missing protocol differs in all of them."""
    if a is None or b is None:
        return list(COMPARABILITY)
    return [name for name in COMPARABILITY if field(a, name) != field(b, name)]


def summary(p: dict) -> str:
    """One line: the fields that decide comparability, and the seeds and sampler."""
    seeds = p.get("seeds") or {}
    drawn = f", seed {seeds['seed']} indices {seeds['indices'][0]}-{seeds['indices'][1]}" if seeds else ""
    sets = f" x {seeds['seed_sets']} seed sets" if seeds.get("seed_sets", 1) > 1 else ""
    sampling = f", {field(p, 'sampling.described')}" if field(p, "sampling.described") else ""
    return (f"{p.get('num_samples')} samples{sets}{drawn}{sampling}; reference statistics "
            f"{str(field(p, 'reference.statistics_sha256'))[:12]} ({field(p, 'reference.statistics')}); Inception "
            f"{str(field(p, 'inception.weights_sha256'))[:12]}, {p.get('feature_layer')}")
