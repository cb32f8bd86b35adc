"""Which weights a sample or evaluate job uses, and the model they go into."""

import json
from dataclasses import dataclass

from . import storage
from .errors import UserError
from .factory import create_any_model_and_diffusion
from .models import ArchitectureMismatch
from .run_dir import RunDir
from .train.checkpoint import CheckpointStore, checkpoint_files


@dataclass
class Weights:
    flags: dict  # create_model_and_diffusion keyword arguments
    path: str
    classes: list[str] | None = None  # class names, index = label, when known

    def build(self, device, timestep_respacing=None):
        """(model in eval mode with these weights, diffusion with the given respacing)."""
        flags = dict(self.flags)
        if timestep_respacing is not None:
            flags["timestep_respacing"] = timestep_respacing
        model, diffusion = create_any_model_and_diffusion(flags)
        try:
            model.load_state_dict(storage.load_torch(self.path))
        except ArchitectureMismatch as err:
            raise UserError(f"{self.path}: {err}") from None
        return model.to(device).eval(), diffusion


def resolve(spec, source) -> Weights:
    """``source`` is the job's ModelSource section (sample or evaluate)."""
    if source.model_path:
        if not storage.exists(source.model_path):
            raise UserError(f"model_path: {source.model_path} does not exist")
        return Weights(spec.model_flags(), source.model_path)

    from .jobs.io import parse_spec

    run = RunDir(source.from_run)
    saved = run.saved_spec()
    if saved is None or saved.get("kind") != "train":
        raise UserError(f"from_run: {source.from_run} is not a training run dir (no train spec.yaml)")
    train_spec = parse_spec({**saved, "run_dir": run.path}, source=run / "spec.yaml")
    store = CheckpointStore(run.checkpoints)
    step = store.latest_complete() if source.checkpoint == "latest" else source.checkpoint
    if step is None:
        raise UserError(f"from_run: {run.path} has no complete checkpoint yet")
    problem = store.problem(step) if step in store.steps() else "it does not exist"
    if problem:
        raise UserError(f"checkpoint {step} of {run.path} cannot be used: {problem}")
    files = checkpoint_files(step, train_spec.train.ema_rates)
    rates = train_spec.train.ema_rates
    if source.use_ema is False:
        name = files["model"]
    else:
        if not rates:
            raise UserError(f"use_ema: {run.path} kept no EMA weights (its ema_rate is empty); set use_ema: false")
        rate = rates[0] if source.use_ema is True else float(source.use_ema)
        if rate not in rates:
            raise UserError(f"use_ema: {rate} is not an EMA rate of {run.path} (it has {', '.join(map(str, rates))})")
        name = files[f"ema_{rate}"]
    flags = train_spec.model_flags()
    if getattr(spec, "diffusion", None) is not None:
        flags.update(spec.diffusion.model_dump())
    classes_path = run / "classes.json"
    classes = json.loads(storage.read_text(classes_path)) if storage.exists(classes_path) else None
    return Weights(flags, store.path(name), classes)
