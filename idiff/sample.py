"""Sample jobs: images in shards that survive preemption, independent of ranks and batch size.

Sample i is a pure function of (model, seed, i): its label, x_T and every step's noise come from
one generator seeded by (seed, i). With ``seed_sets: K`` the job draws indices [0, K N) of N = num_samples,
and seed set k is [k N, (k+1) N): disjoint, and set 0 is what a job of one set draws.
Shards are pure functions of their index range, so a requeued job only draws the ranges no complete shard
covers, and any world size or batch size gives the same images, up to kernels that round differently for
another batch size or thread count (on the CPU a rare pixel may then differ by 1).
"""

import json
import sys

import numpy as np
import torch

from . import storage, weights
from .collect import collect
from .diffusion import samplers
from .diffusion.draw import draw_images, labels_for
from .diffusion.ode_samplers import points_for, time_grid
from .errors import UserError
from .progress import Progress
from .ranks.env import RankEnv
from .shards import complete_ranges, finish_sharded_job, missing_parts, npz_headers, rank_ranges, read_npz, write_shard
from .tuned_schedule import read_schedule


def run_sample(spec, env: RankEnv, hooks) -> str:
    """Draw the shards of ``spec`` (a SampleJob) this rank owns and no earlier job finished; rank 0
    then collects them. Inputs are checked before the run dir is taken: a bad spec writes nothing."""
    s = spec.sample
    source = weights.resolve(spec, s)
    if s.steps and s.steps > source.diffusion.diffusion_steps:
        raise UserError(f"sample.steps: {s.steps} is more than the model's diffusion_steps "
                        f"({source.diffusion.diffusion_steps})")
    model, diffusion = source.build(env.device, timestep_respacing=s.chain_respacing)
    _check_chain_length(s, diffusion.num_timesteps)
    sampler_options = _sampler_options(s, source.path, diffusion)
    image_size, class_cond = source.model.output_size, source.model.class_cond
    _check_class_labels(s.class_labels, class_cond, model.num_classes)
    num_classes = len(source.classes) if source.classes else model.num_classes
    base = _base_samples(s, source.model.small_size, class_cond)

    run_dir = hooks.begin()
    if env.is_main:
        run_dir.record("weights", **source.record())
        if source.classes:  # the names of the labels in arr_1, from the training run
            storage.atomic_write_text(run_dir.classes_file, json.dumps(source.classes, indent=1))

    def shard_arrays(start, end):
        arrays = {"arr_0": ((end - start, image_size, image_size, 3), np.uint8)}
        if class_cond:
            arrays["arr_1"] = ((end - start,), np.int64)
        return arrays

    covered = complete_ranges(run_dir.samples, shard_arrays, env)
    todo = [part for a, b in rank_ranges(s.total_samples, s.batch_size, env.rank, env.world_size)
            for part in missing_parts(a, b, covered)]
    if env.is_main:
        done = sum(b - a for a, b in covered)
        print(f"idiff: sampling {s.total_samples} images ({done} already in shards) from {source.describe()}, "
              f"{env.describe()}",
              file=sys.stderr, flush=True)
    # One line per shard where no terminal shows a bar: rank 0's shards, whose pace is every rank's.
    progress = Progress(sum(b - a for a, b in todo), desc=f"sample {spec.name}", unit="img", enabled=env.is_main,
                        every=1)
    for start, end in todo:
        if hooks.should_suspend():
            break  # complete shards are kept; a rerun draws only what is missing
        indices = list(range(start, end))
        labels = labels_for(indices, s.class_labels, num_classes) if class_cond else None
        low_res = None
        if base is not None:
            low_res = torch.from_numpy(base["arr_0"][start:end]).permute(0, 3, 1, 2).float() / 127.5 - 1
            if class_cond:
                labels = base["arr_1"][start:end].tolist()
        images, labels = draw_images(model, diffusion, indices, seed=s.seed, image_size=image_size,
                                     sampler=s.sampler_name, sampler_options=sampler_options,
                                     clip_denoised=s.clip_denoised, labels=labels, num_classes=num_classes,
                                     low_res=low_res, precision=s.precision, device=env.device)
        write_shard(run_dir.samples, start, end, {"arr_0": images, **({"arr_1": labels} if labels is not None else {})})
        progress.update(end - start)
        hooks.progress(start)
    progress.close()

    def merge():
        out = collect(run_dir.samples, output_dir=run_dir.path, force=True)
        print(f"idiff: wrote {out}", file=sys.stderr, flush=True)

    return finish_sharded_job(env, hooks, merge)


def _check_chain_length(s, chain_length) -> None:
    """Without ``steps`` an ODE solver evaluates the model once per step of the chain: enough for its order?"""
    needed = samplers.MIN_STEPS[s.sampler_name]
    if s.steps is None and chain_length < needed:
        field = "sample.timestep_respacing" if s.timestep_respacing else "diffusion.diffusion_steps"
        raise UserError(f"{field}: the chain has {chain_length} steps, but {s.sampler_name} needs at least {needed} "
                        f"to take one step of its order")


def _sampler_options(s, model_path, diffusion) -> dict:
    """The sampler's options, with the chain times of ``sample.schedule``; checks that an ODE solver's steps fit."""
    options = dict(s.sampler_options)
    if s.schedule:
        options["times"] = read_schedule(s.schedule, s, model_path, diffusion)
    elif s.sampler_name in samplers.ODE_SAMPLERS and s.steps:
        try:
            time_grid(diffusion, points_for(s.sampler_name, s.steps), options["spacing"])
        except ValueError as err:
            raise UserError(f"sample.steps: {err}") from None
    return options


def _check_class_labels(class_labels, class_cond, num_classes) -> None:
    if not isinstance(class_labels, list):
        return
    if not class_cond:
        raise UserError("sample.class_labels lists labels, but this model is not class-conditional")
    wrong = [label for label in class_labels if not 0 <= label < num_classes]
    if wrong:
        raise UserError(f"sample.class_labels: {wrong[0]} is not a label of this model (0 to {num_classes - 1})")


def _base_samples(s, small_size, class_cond) -> dict | None:
    """The low-resolution inputs of a super-resolution model (``small_size`` set), checked."""
    if small_size is None:
        if s.base_samples:
            raise UserError("sample.base_samples is only for super-resolution models (model.large_size)")
        return None
    if not s.base_samples:
        raise UserError("a super-resolution model needs sample.base_samples (an .npz of low-res images)")
    if not storage.exists(s.base_samples):
        raise UserError(f"sample.base_samples: {s.base_samples} does not exist")
    headers = npz_headers(s.base_samples)  # checked before anything is read: the file is untrusted
    images, labels = headers.get("arr_0"), headers.get("arr_1")
    expected = (small_size, small_size, 3)
    if images is None or images.dtype != np.uint8 or len(images.shape) != 4 or images.shape[1:] != expected:
        got = "no arr_0" if images is None else f"arr_0 {images.dtype} {list(images.shape)}"
        raise UserError(f"sample.base_samples: {s.base_samples} holds {got}; the model takes uint8 "
                        f"[N, {small_size}, {small_size}, 3] (model.small_size={small_size})")
    if images.shape[0] < s.total_samples:
        raise UserError(f"sample.base_samples holds {images.shape[0]} images, fewer than "
                        f"num_samples x seed_sets={s.total_samples}")
    if class_cond and (labels is None or len(labels.shape) != 1 or labels.shape[0] < s.total_samples
                       or labels.dtype.kind not in "iu"):
        raise UserError(f"{s.base_samples} has no label (arr_1) for each image, which a class-conditional "
                        f"upsampler needs")
    return read_npz(s.base_samples, ["arr_0", "arr_1"])
