"""``idiff tune-schedule SPEC.yaml --out SCHEDULE.json``, and the schedule files that ``sample.schedule`` reads.

The search (``diffusion.schedule_search``) runs on warm-up images: sample indices 0..N-1 of ``--seed``, a seed of
its own (default: the spec's sample.seed + 1), drawn as a sample job draws them (x_T and labels from each index's
generator), so that the images the spec then samples are not the ones the schedule was tuned on.
A schedule file records what it was tuned for; a sample job refuses it for another model (the weights file's
sha256), sampler or step count.
"""

import json
import math
import sys
import time

import torch

from . import storage, weights
from .diffusion.draw import labels_for, sample_inputs
from .diffusion.ode_samplers import chain_start, points_for
from .diffusion.samplers import ODE_SAMPLERS
from .diffusion.schedule_search import FINE_POINTS, FineReference, check_times, tune_times
from .errors import UserError
from .precision import autocast

FORMAT = "idiff tuned schedule 1"
PIXELS = 127.5  # [-1, 1] -> 0-255 units


def tune_schedule(spec, out: str, *, seed: int | None, warmup: int, fine_points: int = FINE_POINTS) -> dict:
    """Tune the chain times of ``spec`` (a SampleJob) and write them to ``out``; returns the record."""
    s = spec.sample
    if s.sampler not in ODE_SAMPLERS or not s.steps:
        raise UserError(f"tune-schedule needs sample.sampler (one of {', '.join(ODE_SAMPLERS)}) and sample.steps: "
                        f"the schedule is tuned for both (this spec has sampler {s.sampler}, steps {s.steps})")
    source = weights.resolve(spec, s)
    if source.model.is_super_res:
        raise UserError("tune-schedule: super-resolution models are not supported (their inputs are base samples)")
    if s.steps > source.diffusion.diffusion_steps:
        raise UserError(f"sample.steps: {s.steps} is more than the model's diffusion_steps "
                        f"({source.diffusion.diffusion_steps})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, diffusion = source.build(device, timestep_respacing="")
    seed = s.seed + 1 if seed is None else seed
    indices = list(range(warmup))
    labels = labels_for(indices, s.class_labels, model.num_classes) if source.model.class_cond else None
    _, x_T, model_kwargs, _ = sample_inputs(indices, seed=seed, image_size=source.model.image_size, labels=labels,
                                            num_classes=model.num_classes, device=device)
    options = {k: v for k, v in s.sampler_options.items() if k not in ("steps", "spacing")}
    print(f"idiff: tuning {s.sampler} at {s.steps} steps on {warmup} warm-up images of seed {seed}, {device}",
          file=sys.stderr, flush=True)
    with torch.inference_mode(), autocast(device, s.precision):
        reference = FineReference.solve(diffusion, model, x_T, clip_denoised=s.clip_denoised,
                                        model_kwargs=model_kwargs, fine_points=fine_points)
        result = tune_times(diffusion, model, reference, sampler=s.sampler, steps=s.steps, sampler_options=options)
    record = {
        "format": FORMAT, "sampler": s.sampler, "steps": s.steps, "sampler_options": options,
        "clip_denoised": s.clip_denoised, "model_sha256": storage.file_digest(source.path)["sha256"],
        "model": source.path, "times": result.times, "warmup_images": warmup, "seed": seed,
        "fine_points": len(reference.times), "rmse": PIXELS * result.rmse,
        "candidates_rmse": {name: PIXELS * e for name, e in result.candidates.items()},
        "nfe": result.nfe * warmup, "nfe_per_image": result.nfe, "seconds": result.seconds,
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    return record


def read_schedule(path: str, sample, model_path: str, diffusion) -> list[float]:
    """The chain times in schedule file ``path`` for ``sample`` (a SampleSection) with the weights at
    ``model_path`` on ``diffusion``'s chain; a UserError naming the file when it does not fit."""
    field = "sample.schedule"
    if not storage.exists(path):
        raise UserError(f"{field}: {path} does not exist")
    try:
        record = json.loads(storage.read_bytes(path))
    except ValueError as err:  # not JSON, or not UTF-8
        raise UserError(f"{field}: {path} is not a schedule file: not readable JSON ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{field}: {path} is not a schedule file of `idiff tune-schedule` (no format {FORMAT!r})")
    for key, ours in (("sampler", sample.sampler), ("steps", sample.steps)):
        if record.get(key) != ours:
            raise UserError(f"{field}: {path} was tuned for {key} {record.get(key)}, but this spec's sample.{key} is "
                            f"{ours}: tune one for it (idiff tune-schedule)")
    digest = storage.file_digest(model_path)["sha256"]
    if record.get("model_sha256") != digest:
        raise UserError(f"{field}: {path} was tuned for another model (sha256 {str(record.get('model_sha256'))[:12]}"
                        f"..., {record.get('model')}), not {model_path} (sha256 {digest[:12]}...)")
    times = record.get("times")
    problem = check_times(times, chain_start(diffusion), points_for(sample.sampler, sample.steps))
    if problem is None and not all(math.isfinite(t) for t in times):
        problem = "its times are not finite"
    if problem:
        raise UserError(f"{field}: {path} holds no schedule of this chain: {problem}")
    return [float(t) for t in times]
