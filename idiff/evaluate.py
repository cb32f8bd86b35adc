"""Evaluate jobs: NLL in bits/dim (the paper's metric), and FID / IS / precision-recall via torch-fidelity.

Results go to ``run_dir/eval/<metric>.json`` and, all together, ``run_dir/metrics.json``; NLL also
writes its per-timestep terms to ``eval/nll_terms.npz``. NLL is computed in per-range part files
(as sampling uses shards), so a preempted evaluation resumes where it stopped. Every input is
checked before the run dir is taken, so a bad spec writes nothing.
"""

import io
import json
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import rng, storage, weights
from .data import ImageDataset, PackedDataset, open_images
from .data.packed import count_images
from .errors import UserError
from .progress import Progress
from .ranks.env import RankEnv
from .ranks.signals import any_rank
from .run_dir import RunDir
from .shards import complete_ranges, missing_parts, npz_headers, rank_ranges, read_npz, scan_shards, write_shard

FIDELITY_METRICS = {"fid": "fid", "inception_score": "isc", "precision_recall": "prc"}
# torch-fidelity defaults precision/recall to VGG16 features; Inception's pool features (as in the
# ADM evaluator) keep all three metrics on one network and one weights file.
FEATURE_EXTRACTOR = "inception-v3-compat"
PRC_NEIGHBORHOOD = 3
PER_TIMESTEP_TERMS = ("vb", "mse", "xstart_mse")  # calc_bpd_loop's [N, T] outputs
# Fewer images than this leave a metric undefined: a covariance needs 2, the k-th neighbour k + 1.
MIN_IMAGES = {"fid": 2, "inception_score": 1, "precision_recall": PRC_NEIGHBORHOOD + 1}


def run_evaluate(spec, env: RankEnv, hooks) -> str:
    e = spec.evaluate
    nll = _prepare_nll(spec, env) if "nll" in e.metrics else None
    wanted = [m for m in e.metrics if m in FIDELITY_METRICS]
    inputs = fidelity_inputs(e.samples, e.reference, wanted, e.inception_weights) if wanted else None

    run_dir = hooks.begin()
    results = {}
    if nll is not None:
        if _nll(nll, e, env, run_dir, hooks) == "preempted":
            return "preempted"
        if env.is_main:
            results["nll"] = json.loads(storage.read_text(run_dir.nll_summary))
    if inputs is not None and env.is_main:
        results.update(fidelity_metrics(inputs, wanted, env.device))
        for metric in wanted:
            storage.atomic_write_text(storage.join(run_dir.eval, f"{metric}.json"),
                                      json.dumps(results[metric], indent=1))
    if env.is_main:
        storage.atomic_write_text(run_dir.metrics_file, json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    if env.world_size > 1:
        dist.barrier()
    return "completed"


# ------------------------------------------------------------------------------------------- NLL
@dataclass
class _NllSetup:
    model: torch.nn.Module
    diffusion: object
    dataset: ImageDataset | PackedDataset
    label_of: list[int] | None  # dataset label -> model label; None: unconditional
    num: int  # images to evaluate, the first ones of the dataset


def _prepare_nll(spec, env) -> _NllSetup:
    e = spec.evaluate
    source = weights.resolve(spec, e)
    model, diffusion = source.build(env.device)
    flags = source.flags
    if flags.get("large_size") is not None:
        raise UserError("nll of super-resolution models is not supported (they need low-res inputs)")
    dataset = open_images(e.data_dir, flags["image_size"], class_cond=flags["class_cond"])
    label_of = _label_mapping(dataset, source) if flags["class_cond"] else None
    return _NllSetup(model, diffusion, dataset, label_of, min(e.num_samples, len(dataset)))


def _nll(setup: _NllSetup, e, env, run_dir, hooks) -> str:
    parts_dir = run_dir.nll_parts
    part_arrays = _nll_part_arrays(setup.diffusion.num_timesteps)
    covered = complete_ranges(parts_dir, part_arrays, env)
    todo = [part for a, b in rank_ranges(setup.num, e.batch_size, env.rank, env.world_size)
            for part in missing_parts(a, b, covered)]
    show = env.is_main and sys.stderr.isatty()
    # One line per part where no terminal shows a bar: rank 0's parts, whose pace is every rank's.
    progress = Progress(sum(b - a for a, b in todo), desc="nll", unit="img", enabled=env.is_main, every=1)
    bpd_sum, images = 0.0, 0  # rank 0's running mean, for the progress line
    for start, end in todo:
        if hooks.should_suspend():
            break  # parts written so far are kept; a rerun continues from them
        out = {k: v.cpu().numpy() for k, v in _nll_part(setup, e, env.device, start, end, show).items()}
        # Per image: the bpd; per timestep: sums over the part's images, so that the merge stays small.
        part = {"total_bpd": out["total_bpd"], "prior_bpd": out["prior_bpd"],
                **{f"{k}_sum": out[k].sum(axis=0, dtype=np.float64) for k in PER_TIMESTEP_TERMS}}
        layout = part_arrays(start, end)
        write_shard(parts_dir, start, end, {k: np.asarray(v, dtype=layout[k][1]) for k, v in part.items()})
        bpd_sum, images = bpd_sum + float(out["total_bpd"].sum()), images + end - start
        progress.update(end - start, bpd=bpd_sum / images)
    progress.close()
    if any_rank(hooks.should_suspend()):
        return "preempted"
    if env.world_size > 1:
        dist.barrier()
    if env.is_main:
        _merge_nll(parts_dir, setup.num, run_dir, setup.diffusion.num_timesteps)
    return "completed"


def _nll_part_arrays(num_timesteps: int):
    """(start, end) -> {array: (shape, dtype)} of an NLL part file: what a part must hold to count as done."""
    def arrays_of(start, end):
        per_image = {name: ((end - start,), np.float32) for name in ("total_bpd", "prior_bpd")}
        return {**per_image, **{f"{k}_sum": ((num_timesteps,), np.float64) for k in PER_TIMESTEP_TERMS}}

    return arrays_of


def _nll_part(setup: _NllSetup, e, device, start, end, progress: bool) -> dict:
    """calc_bpd_loop over images [start, end): each image's noise comes from its own generator."""
    examples = [setup.dataset[i] for i in range(start, end)]
    x = torch.from_numpy(np.stack([ex.image for ex in examples])).to(device)
    kwargs = {} if setup.label_of is None else \
        {"y": torch.tensor([setup.label_of[ex.label] for ex in examples], device=device)}
    noise = rng.PerSampleNoise(rng.generators(e.seed, rng.Stream.NLL, range(start, end)))
    with torch.inference_mode():
        return setup.diffusion.calc_bpd_loop(setup.model, x, clip_denoised=e.clip_denoised, model_kwargs=kwargs,
                                             noise_fn=noise, progress=progress)


def _label_mapping(dataset, source) -> list[int]:
    """Dataset label -> model label, through the class names the training run saved (when known)."""
    if not source.classes:
        return list(range(len(dataset.classes)))
    unknown = [c for c in dataset.classes if c not in source.classes]
    if unknown:
        raise UserError(f"evaluate.data_dir has classes the model was not trained on: {', '.join(unknown[:5])}")
    return [source.classes.index(c) for c in dataset.classes]


def _merge_nll(parts_dir, num, run_dir, num_timesteps) -> None:
    parts = scan_shards(parts_dir)
    if sum(p.end - p.start for p in parts) != num:
        raise UserError(f"{parts_dir}: NLL parts cover {sum(p.end - p.start for p in parts)} of {num} images")
    loaded = [read_npz(p.path) for p in parts]
    merged = {k: np.concatenate([d[k] for d in loaded]) for k in ("total_bpd", "prior_bpd")}
    terms = {f"{k}_per_timestep": sum(d[f"{k}_sum"] for d in loaded) / num
             for k in PER_TIMESTEP_TERMS}
    buffer = io.BytesIO()
    np.savez(buffer, total_bpd=merged["total_bpd"], prior_bpd=merged["prior_bpd"], **terms)
    storage.atomic_write_bytes(run_dir.nll_terms, buffer.getvalue())
    summary = {
        "bpd": float(merged["total_bpd"].mean()),
        "bpd_stderr": float(merged["total_bpd"].std(ddof=1) / np.sqrt(num)) if num > 1 else None,
        "prior_bpd": float(merged["prior_bpd"].mean()),
        "num_images": int(num),
        "num_timesteps": int(num_timesteps),
        "note": "per image total_bpd/prior_bpd and per-timestep vb/mse/xstart_mse means in nll_terms.npz; "
                "timestep index 0 is t = T-1",
    }
    storage.atomic_write_text(run_dir.nll_summary, json.dumps(summary, indent=1))


# ------------------------------------------------------------------------------ FID / IS / PR
@dataclass(frozen=True)
class ImageSource:
    """An image set as found on disk: an .npz batch (arr_0) or a folder of image files."""

    path: str
    what: str  # the spec field, for messages
    count: int
    size: tuple[int, int] | None  # (H, W); None for a folder, whose images are resized to the other set's

    @property
    def is_npz(self) -> bool:
        return self.size is not None


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
    images = npz_headers(path).get("arr_0")
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


@dataclass(frozen=True)
class FidelityInputs:
    samples: ImageSource
    reference: ImageSource
    size: tuple[int, int]
    inception_state: dict  # the Inception weights, checked to be plain tensors


def fidelity_inputs(samples, reference, metrics, inception_weights) -> FidelityInputs:
    """The two image sets (checked, not loaded yet) and the weights of a FID / IS / PR evaluation."""
    generated = find_images(samples, "evaluate.samples")
    real = find_images(reference, "evaluate.reference")
    if generated.size and real.size and generated.size != real.size:
        raise UserError("evaluate.reference is {}x{} but the samples are {}x{}; use a reference batch of the "
                        "samples' resolution".format(*real.size, *generated.size))
    size = generated.size or real.size
    if size is None:
        raise UserError("evaluate.samples and evaluate.reference are both image folders: one of them must be "
                        "an .npz, which gives the resolution to compare at")
    for metric in metrics:
        for images in (generated, real):
            if images.count < MIN_IMAGES[metric]:
                raise UserError(f"{metric} needs at least {MIN_IMAGES[metric]} images, but {images.what} "
                                f"({images.path}) has {images.count}")
    return FidelityInputs(generated, real, size, _trusted_state_dict(inception_weights_file(inception_weights)))


def inception_weights_file(configured: str | None) -> str:
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


class _Uint8Images(torch.utils.data.Dataset):
    """uint8 CHW tensors, what torch-fidelity's Inception expects."""

    def __init__(self, images_nhwc: np.ndarray):
        self.images = images_nhwc

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def fidelity_metrics(inputs: FidelityInputs, metrics, device) -> dict:
    """``{metric: {...numbers, num_samples, num_reference}}`` for the FIDELITY_METRICS in ``metrics``."""
    import torch_fidelity

    generated = load_images(inputs.samples, inputs.size)
    real = load_images(inputs.reference, inputs.size)
    with tempfile.TemporaryDirectory() as tmp:
        # torch-fidelity unpickles with weights_only=False: give it a file we wrote from plain tensors.
        trusted = os.path.join(tmp, "inception.pth")
        torch.save(inputs.inception_state, trusted)
        flags = {FIDELITY_METRICS[m]: True for m in metrics}
        out = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(generated), input2=_Uint8Images(real), cuda=torch.device(device).type == "cuda",
            feature_extractor=FEATURE_EXTRACTOR, feature_extractor_weights_path=trusted, cache=False,
            verbose=False, batch_size=64, isc_splits=min(10, len(generated)), prc_neighborhood=PRC_NEIGHBORHOOD,
            # Blocked k-NN distances: the full matrix of 50,000 images would take 10 GB. In-memory
            # inputs need no loader workers either.
            save_cpu_ram=True, **flags)
    results = {}
    if "fid" in metrics:
        results["fid"] = {"fid": out["frechet_inception_distance"]}
    if "inception_score" in metrics:
        results["inception_score"] = {"mean": out["inception_score_mean"], "std": out["inception_score_std"]}
    if "precision_recall" in metrics:
        results["precision_recall"] = {"precision": out["precision"], "recall": out["recall"],
                                       "f_score": out.get("f_score"), "neighborhood": PRC_NEIGHBORHOOD}
    for result in results.values():
        result.update(num_samples=int(len(generated)), num_reference=int(len(real)), features=FEATURE_EXTRACTOR)
    return results
