"""Which weights a sample or evaluate job uses, and the model they go into."""

import json
from dataclasses import dataclass

import torch

from . import storage
from .checkpoints import CheckpointStore, checkpoint_files
from .errors import UserError, brief
from .factory import model_and_diffusion
from .jobspec.schema import DiffusionSection, ModelSection, check_respacing
from .models import ArchitectureMismatch
from .models.state_dict_check import check_state_dict
from .run_dir import RunDir


@dataclass
class Weights:
    model: ModelSection  # the architecture these weights fit
    diffusion: DiffusionSection  # the process they were trained for (or the sampling spec's own)
    path: str
    classes: list[str] | None = None  # class names, index = label, when known
    field: str = "model_path"  # the spec field that chose these weights, for messages
    step: int | None = None  # the checkpoint's step, with from_run
    ema_rate: float | None = None  # the EMA rate of these weights; None: the raw model weights (or unknown)

    def describe(self) -> str:
        """What a job's first line and its run dir say about the weights it uses."""
        if self.step is None:
            return f"weights {self.path}"
        kind = f"EMA {self.ema_rate}" if self.ema_rate is not None else "raw (non-EMA) model"
        return f"checkpoint step {self.step} of {self.path.rsplit('/checkpoints/', 1)[0]}, {kind} weights"

    def record(self) -> dict:
        """The same, as fields of the run dir's history."""
        return {"weights": self.path, "checkpoint_step": self.step, "ema_rate": self.ema_rate}

    def build(self, device, timestep_respacing=None):
        """(model in eval mode with these weights, diffusion with the given respacing)."""
        sections = self.diffusion
        if timestep_respacing is not None:
            try:  # a spec's own diffusion_steps were checked with it; a training run's are known only now
                check_respacing(timestep_respacing, sections.diffusion_steps,
                                f"{self.field.split('.')[0]}.timestep_respacing")
            except ValueError as err:
                raise UserError(str(err)) from None
            sections = sections.model_copy(update={"timestep_respacing": timestep_respacing})
        model, diffusion = model_and_diffusion(self.model, sections)
        load_weights(model, self.path, self.field)
        return model.to(device).eval(), diffusion


def load_weights(model, path, field: str) -> None:
    """Load the weights file ``path`` (which the spec's ``field`` names) into ``model``."""
    model.load_state_dict(read_weights(model, path, field))


def read_weights(model, path, field: str) -> dict:
    """The state dict in ``path``, checked to fit ``model`` (a model or EMA file: both are model-shaped)."""
    state = read_torch(path, field)
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"{field}: {path} holds a {type(state).__name__}, not a plain state dict of tensors")
    try:
        check_state_dict(model, state)
    except ArchitectureMismatch as err:
        raise UserError(f"{field}: {path}: {err}") from None
    return state


def read_torch(path, field: str):
    """What the torch file ``path`` (which the spec's ``field`` names) holds.

    A weights file is untrusted: it is read with weights_only=True, which refuses pickled code, and a file
    that is truncated, corrupt or of another kind is the user's error.
    """
    if not storage.exists(path):
        raise UserError(f"{field}: {path} does not exist")
    try:
        return storage.load_torch(path)
    except Exception as err:  # torch's readers raise whatever the malformed bytes lead them to
        raise UserError(f"{field}: {path} cannot be loaded as a checkpoint: it is truncated, corrupt, not a PyTorch "
                        f"file, or holds pickled objects besides tensors, which idiff refuses "
                        f"({type(err).__name__})") from None


def load_optimizer_state(opt, path, field: str) -> None:
    """The optimizer state in ``path`` (an ``opt*.pt`` of the original or of idiff) into ``opt``.

    Only the per-parameter state (moments, step counts) comes from the file; the settings (weight decay,
    betas, fused) stay those of ``opt``, i.e. of the spec. Setting them before loading lets torch put the
    step counts where those settings want them (on the GPU for the fused AdamW).
    """
    state = read_torch(path, field)
    settings = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    params = [p for group in opt.param_groups for p in group["params"]]
    try:
        groups = [{**saved, **own} for saved, own in zip(state["param_groups"], settings, strict=True)]
        misshaped = [i for i, moments in state["state"].items()
                     if moments["exp_avg"].shape != params[i].shape]
        if misshaped:
            raise ValueError(f"the moments of parameter {misshaped[0]} do not have its shape")
        opt.load_state_dict({**state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise UserError(f"{field}: {path} is not an AdamW state of this model ({brief(str(err))})") from None


def resolve(spec, source) -> Weights:
    """``source`` is the job's ModelSource section (sample or evaluate)."""
    if source.model_path:
        return Weights(spec.model, spec.diffusion or DiffusionSection(), source.model_path,
                       field=f"{spec.kind}.model_path")

    run = RunDir(source.from_run)
    saved = run.saved_spec()
    if saved is None or saved.get("kind") != "train":
        raise UserError(f"from_run: {source.from_run} is not a training run dir (no train spec.yaml)")
    train_spec = run.saved_job()
    store = CheckpointStore(run.checkpoints)
    step = store.latest_complete() if source.checkpoint == "latest" else source.checkpoint
    if step is None:
        raise UserError(f"from_run: {run.path} has no complete checkpoint yet")
    if step not in store.steps():
        usable = [s for s in store.steps() if not store.problem(s)]
        raise UserError(f"checkpoint: step {step} of {run.path} does not exist; its complete checkpoints are at steps "
                        f"{', '.join(map(str, usable)) or '(none yet)'}")
    problem = store.problem(step)
    if problem:
        raise UserError(f"checkpoint {step} of {run.path} cannot be used: {problem}")
    files = checkpoint_files(step, train_spec.train.ema_rates)
    rates = train_spec.train.ema_rates
    rate = None
    if source.use_ema is False:
        name = files["model"]
    else:
        if not rates:
            raise UserError(f"use_ema: {run.path} kept no EMA weights (its ema_rate is empty); set use_ema: false")
        rate = rates[0] if source.use_ema is True else float(source.use_ema)
        if rate not in rates:
            raise UserError(f"use_ema: {rate} is not an EMA rate of {run.path} (it has {', '.join(map(str, rates))})")
        name = files[f"ema_{rate}"]
    diffusion = spec.diffusion if getattr(spec, "diffusion", None) is not None else train_spec.diffusion
    return Weights(train_spec.model, diffusion, store.path(name), _class_names(run.classes_file),
                   field=f"{spec.kind}.from_run", step=step, ema_rate=rate)


def _class_names(path) -> list[str] | None:
    """The label names a training run saved, or None without them."""
    if not storage.exists(path):
        return None
    try:
        names = json.loads(storage.read_bytes(path))
    except ValueError as err:  # not JSON, or not UTF-8
        raise UserError(f"from_run: {path} is not readable JSON ({brief(str(err))})") from None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise UserError(f"from_run: {path} is not a list of class names")
    return names
