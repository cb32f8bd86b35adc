"""Evaluate jobs: NLL in bits/dim (the paper's metric), and FID / sFID / IS / precision-recall (idiff.fidelity).

Results go to ``run_dir/eval/<metric>.json`` and, all together, ``run_dir/metrics.json`` (with the
``protocol`` of the fidelity scores: how they were obtained, see idiff.fidelity.protocol); NLL also
writes its per-timestep terms to ``eval/nll_terms.npz``. NLL is computed in per-range part files
(as sampling uses shards), so a preempted evaluation resumes where it stopped. Every input is
checked before the run dir is taken, so a bad spec writes nothing.
"""

import io
import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import rng, storage, weights
from .data import ImageDataset, PackedDataset, open_images
from .errors import UserError
from .fidelity import FIDELITY_METRICS, fidelity_inputs, fidelity_metrics
from .progress import Progress
from .ranks.env import RankEnv
from .shards import complete_ranges, finish_sharded_job, missing_parts, rank_ranges, read_npz, scan_shards, write_shard

PER_TIMESTEP_TERMS = ("vb", "mse", "xstart_mse")  # calc_bpd_loop's [N, T] outputs


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
        results.update(fidelity_metrics(inputs, wanted, env.device))  # and their "protocol"
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
    if source.model.is_super_res:
        raise UserError("nll of super-resolution models is not supported (they need low-res inputs)")
    class_cond = source.model.class_cond
    dataset = open_images(e.data_dir, source.model.image_size, class_cond=class_cond)
    label_of = _label_mapping(dataset, source) if class_cond else None
    return _NllSetup(model, diffusion, dataset, label_of, min(e.num_samples, len(dataset)))


def _nll(setup: _NllSetup, e, env, run_dir, hooks) -> str:
    parts_dir = run_dir.nll_parts
    part_arrays = _nll_part_arrays(setup.diffusion.num_timesteps)
    covered = complete_ranges(parts_dir, part_arrays, env)
    todo = [part for a, b in rank_ranges(setup.num, e.batch_size, env.rank, env.world_size)
            for part in missing_parts(a, b, covered)]
    # Counted in timesteps, since one part (a batch of images through all T of them) can take minutes: a bar on a
    # terminal, else a line every twentieth of rank 0's work, whose pace is every rank's.
    steps = setup.diffusion.num_timesteps
    progress = Progress(len(todo) * steps, desc="nll", unit="step", enabled=env.is_main)
    bpd_sum, images = 0.0, 0  # rank 0's running mean, for the progress line
    for start, end in todo:
        if hooks.should_suspend():
            break  # parts written so far are kept; a rerun continues from them
        out = {k: v.cpu().numpy() for k, v in _nll_part(setup, e, env.device, start, end, progress.update).items()}
        # Per image: the bpd; per timestep: sums over the part's images, so that the merge stays small.
        part = {"total_bpd": out["total_bpd"], "prior_bpd": out["prior_bpd"],
                **{f"{k}_sum": out[k].sum(axis=0, dtype=np.float64) for k in PER_TIMESTEP_TERMS}}
        layout = part_arrays(start, end)
        write_shard(parts_dir, start, end, {k: np.asarray(v, dtype=layout[k][1]) for k, v in part.items()})
        bpd_sum, images = bpd_sum + float(out["total_bpd"].sum()), images + end - start
        progress.update(0, bpd=bpd_sum / images, images=images)
        hooks.progress(start)
    progress.close()
    return finish_sharded_job(env, hooks, lambda: _merge_nll(parts_dir, setup.num, run_dir,
                                                             setup.diffusion.num_timesteps))


def _nll_part_arrays(num_timesteps: int):
    """(start, end) -> {array: (shape, dtype)} of an NLL part file: what a part must hold to count as done."""
    def arrays_of(start, end):
        per_image = {name: ((end - start,), np.float32) for name in ("total_bpd", "prior_bpd")}
        return {**per_image, **{f"{k}_sum": ((num_timesteps,), np.float64) for k in PER_TIMESTEP_TERMS}}

    return arrays_of


def _nll_part(setup: _NllSetup, e, device, start, end, progress) -> dict:
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
