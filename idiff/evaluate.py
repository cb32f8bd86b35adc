"""Evaluate jobs: NLL in bits/dim (the paper's metric), and FID / IS / precision-recall via torch-fidelity.

Results go to ``run_dir/eval/<metric>.json``; NLL also writes its per-timestep terms to
``eval/nll_terms.npz``. NLL is computed in per-range part files (as sampling uses shards), so a
preempted evaluation resumes where it stopped.
"""

import io
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import rng, storage, weights
from .collect import scan_shards, shard_name
from .data import ImageDataset
from .errors import UserError
from .launch.env import RankEnv
from .launch.signals import any_rank
from .run_dir import RunDir
from .sample import missing_parts, rank_ranges

FIDELITY_METRICS = {"fid": "fid", "inception_score": "isc", "precision_recall": "prc"}


def run_evaluate(spec, env: RankEnv, hooks=None) -> str:
    e = spec.evaluate
    run_dir = RunDir(spec.run_dir)
    results = {}
    if "nll" in e.metrics:
        status = _nll(spec, env, run_dir, should_suspend)
        if status != "completed":
            return status
        if env.is_main:
            results["nll"] = json.loads(storage.read_text(storage.join(run_dir.eval, "nll.json")))
    wanted = [m for m in e.metrics if m in FIDELITY_METRICS]
    if wanted and env.is_main:
        results.update(fidelity_metrics(e.samples, e.reference, wanted, e.inception_weights, env.device))
        for metric in wanted:
            storage.atomic_write_text(storage.join(run_dir.eval, f"{metric}.json"),
                                      json.dumps(results[metric], indent=1))
    if env.is_main:
        storage.atomic_write_text(storage.join(run_dir.path, "metrics.json"), json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
    if env.world_size > 1:
        dist.barrier()
    return "completed"


# ------------------------------------------------------------------------------------------- NLL
def _nll(spec, env, run_dir, should_suspend) -> str:
    e = spec.evaluate
    source = weights.resolve(spec, e)
    model, diffusion = source.build(env.device)
    flags = source.flags
    if flags.get("large_size") is not None:
        raise UserError("nll of super-resolution models is not supported (they need low-res inputs)")
    dataset = ImageDataset(e.data_dir, flags["image_size"], class_cond=flags["class_cond"])
    label_of = _label_mapping(dataset, source)
    num = min(e.num_samples, len(dataset))
    parts_dir = storage.join(run_dir.eval, "nll_parts")
    covered = [(p.start, p.end) for p in scan_shards(parts_dir)]
    todo = [part for a, b in rank_ranges(num, e.batch_size, env.rank, env.world_size)
            for part in missing_parts(a, b, covered)]
    for start, end in tqdm(todo, desc="nll", unit="batch", disable=not (env.is_main and sys.stderr.isatty())):
        if hooks.should_suspend():
            break  # parts written so far are kept; a rerun continues from them
        examples = [dataset[i] for i in range(start, end)]
        x = torch.from_numpy(np.stack([ex.image for ex in examples])).to(env.device)
        kwargs = {"y": torch.tensor([label_of[ex.label] for ex in examples], device=env.device)} \
            if flags["class_cond"] else {}
        noise = rng.PerSampleNoise(rng.generators(e.seed, rng.Stream.NLL, range(start, end)))
        with torch.inference_mode():
            out = diffusion.calc_bpd_loop(model, x, clip_denoised=e.clip_denoised, model_kwargs=kwargs,
                                          noise_fn=noise, progress=env.is_main and sys.stderr.isatty())
        buffer = io.BytesIO()
        np.savez(buffer, **{k: v.cpu().numpy() for k, v in out.items()})
        storage.atomic_write_bytes(storage.join(parts_dir, shard_name(start, end)), buffer.getvalue())
    if any_rank(bool(hooks.should_suspend()), env.device):
        return "preempted"
    if env.world_size > 1:
        dist.barrier()
    if env.is_main:
        _merge_nll(parts_dir, num, run_dir, diffusion.num_timesteps)
    return "completed"


def _label_mapping(dataset, source) -> list[int] | None:
    """Dataset label -> model label, through the class names the training run saved (when known)."""
    if dataset.classes is None:
        return None
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
    loaded = [dict(np.load(io.BytesIO(storage.read_bytes(p.path)))) for p in parts]
    merged = {k: np.concatenate([d[k] for d in loaded]) for k in loaded[0]}
    terms = {f"{k}_per_timestep": merged[k].mean(axis=0) for k in ("vb", "mse", "xstart_mse")}
    buffer = io.BytesIO()
    np.savez(buffer, total_bpd=merged["total_bpd"], prior_bpd=merged["prior_bpd"], **terms)
    storage.atomic_write_bytes(storage.join(run_dir.eval, "nll_terms.npz"), buffer.getvalue())
    summary = {
        "bpd": float(merged["total_bpd"].mean()),
        "bpd_stderr": float(merged["total_bpd"].std(ddof=1) / np.sqrt(num)) if num > 1 else None,
        "prior_bpd": float(merged["prior_bpd"].mean()),
        "num_images": int(num),
        "num_timesteps": int(num_timesteps),
        "note": "vb/mse/xstart_mse per timestep in nll_terms.npz; index 0 is t = T-1",
    }
    storage.atomic_write_text(storage.join(run_dir.eval, "nll.json"), json.dumps(summary, indent=1))


# ------------------------------------------------------------------------------ FID / IS / PR
class _Uint8Images(torch.utils.data.Dataset):
    """uint8 CHW tensors, what torch-fidelity's Inception expects."""

    def __init__(self, images_nhwc: np.ndarray):
        self.images = images_nhwc

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def load_images(path, size: int | None = None, what: str = "images") -> np.ndarray:
    """uint8 NHWC from an .npz (arr_0), a sample run dir (its collected .npz) or an image folder."""
    path = str(path)
    if storage.isdir(path):
        collected = sorted(n for n in storage.listdir(path) if n.startswith("samples_") and n.endswith(".npz"))
        if collected:
            return load_images(storage.join(path, collected[-1]), size, what)
        if size is None:
            raise UserError(f"{what}: {path} is a folder, so the image size must come from the other input")
        dataset = ImageDataset(path, size)
        return np.stack([((dataset[i].image.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
                         for i in range(len(dataset))])
    if not storage.exists(path):
        raise UserError(f"{what}: {path} does not exist")
    with np.load(io.BytesIO(storage.read_bytes(path))) as data:
        if "arr_0" not in data.files:
            raise UserError(f"{what}: {path} has no arr_0 (uint8 NHWC images)")
        images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{what}: {path} arr_0 is {images.dtype} {list(images.shape)}, expected uint8 [N, H, W, 3]")
    return images


def inception_weights_file(configured: str | None) -> str:
    """A path to the Inception weights, checked to hold only tensors (checkpoints are untrusted)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    path = configured or os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(URL_INCEPTION_V3))
    if not storage.exists(path):
        raise UserError(
            f"Inception weights not found at {path}. Cluster nodes are often offline: download {URL_INCEPTION_V3} "
            f"on a machine with internet and set evaluate.inception_weights to its path (or put it at "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}/)."
        )
    return path


def fidelity_metrics(samples, reference, metrics, inception_weights, device) -> dict:
    import torch_fidelity

    generated = load_images(samples, what="evaluate.samples")
    real = load_images(reference, size=generated.shape[1], what="evaluate.reference")
    if real.shape[1:3] != generated.shape[1:3]:
        raise UserError(f"evaluate.reference is {real.shape[1]}x{real.shape[2]} but the samples are "
                        f"{generated.shape[1]}x{generated.shape[2]}; use a reference batch of the samples' resolution")
    state = storage.load_torch(inception_weights_file(inception_weights))
    with tempfile.TemporaryDirectory() as tmp:
        # torch-fidelity unpickles with weights_only=False: give it a file we wrote from plain tensors.
        trusted = os.path.join(tmp, "inception.pth")
        torch.save(state, trusted)
        flags = {FIDELITY_METRICS[m]: True for m in metrics}
        out = torch_fidelity.calculate_metrics(
            input1=_Uint8Images(generated), input2=_Uint8Images(real), cuda=torch.device(device).type == "cuda",
            feature_extractor_weights_path=trusted, cache=False, verbose=False, batch_size=64,
            isc_splits=min(10, len(generated)), **flags)
    results = {}
    if "fid" in metrics:
        results["fid"] = {"fid": out["frechet_inception_distance"]}
    if "inception_score" in metrics:
        results["inception_score"] = {"mean": out["inception_score_mean"], "std": out["inception_score_std"]}
    if "precision_recall" in metrics:
        results["precision_recall"] = {"precision": out["precision"], "recall": out["recall"],
                                       "f_score": out.get("f_score")}
    for result in results.values():
        result.update(num_samples=int(len(generated)), num_reference=int(len(real)))
    return results
