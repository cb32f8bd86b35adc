"""Job specs: the single source of truth for what a run is.

The ``model`` and ``diffusion`` sections are exactly the keyword arguments of
``create_model_and_diffusion`` (or ``sr_create_model_and_diffusion`` when ``large_size`` is set).
CLI flags, ``--help``, ``idiff spec --docs`` and error messages are all generated from these models.
"""

import hashlib
import json
import math
import os
from typing import Annotated, ClassVar, Literal

from pydantic import (
    Field,
    PositiveInt,
    field_validator,
    model_validator,
)

from ..diffusion.ode_samplers import SPACINGS, resolve_spacing
from ..diffusion.respace import parse_respacing, space_timesteps
from ..diffusion.samplers import MAX_SOLVER_ORDER, MIN_STEPS, ODE_SAMPLERS, SAMPLERS
from ..diffusion.schedules import SCHEDULES, get_named_beta_schedule
from ..diffusion.timestep_sampler import SCHEDULE_SAMPLERS
from ..diffusion.unipc import VARIANTS as UNIPC_VARIANTS
from ..errors import brief
from ..models.architecture import attention_factors, parse_channel_mult
from .resources import Resources
from .section import PathText, Section, Seed

Precision = Literal["fp32", "bf16", "fp16"]


class ModelSection(Section):
    """The UNet. Names and defaults are the original's flags."""

    image_size: PositiveInt = Field(64, description="side of the square images, px")
    num_channels: PositiveInt = Field(128, description="channels at the first resolution level",
        json_schema_extra={"aliases": ["model_channels", "channels", "base_channels"]})
    num_res_blocks: PositiveInt = Field(2, description="residual blocks per resolution level",
        json_schema_extra={"aliases": ["res_blocks", "layers_per_block"]})
    num_heads: PositiveInt = Field(4, description="attention heads")
    num_heads_upsample: int = Field(-1, ge=-1, description="attention heads in the decoder; -1 = num_heads")
    attention_resolutions: str = Field("16,8", description="resolutions (px) that get self-attention, comma list")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout rate in the residual blocks")
    learn_sigma: bool = Field(False, description="learn the variance (L_hybrid / L_vlb); 6 output channels")
    class_cond: bool = Field(False, description="condition on class labels (file-name prefixes)")
    num_classes: PositiveInt = Field(1000, description="label count of a class-conditional model")
    use_checkpoint: bool = Field(False, description="gradient checkpointing: less memory, ~30% more compute")
    use_scale_shift_norm: bool = Field(True, description="condition through GroupNorm scale and shift")
    channel_mult: str = Field("", description="channel multiplier per level, e.g. '1,2,2,2'; '' = by image_size")
    large_size: PositiveInt | None = Field(None, description="super-resolution model: output size, px")
    small_size: PositiveInt | None = Field(None, description="super-resolution model: low-res input size, px")

    @field_validator("attention_resolutions", "channel_mult")
    @classmethod
    def _comma_ints(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not all(p.isdecimal() and int(p) > 0 for p in parts):
            raise ValueError(f"expected comma-separated positive integers, got {brief(value)}")
        return ",".join(parts)

    @field_validator("num_channels")
    @classmethod
    def _group_norm_splits(cls, value: int) -> int:
        if value % 32:  # every normalization of the UNet is a GroupNorm of 32 groups (models.blocks)
            raise ValueError(f"must be a multiple of 32, GroupNorm's group count (got {value})")
        return value

    @model_validator(mode="after")
    def _super_res_sizes(self):
        if (self.large_size is None) != (self.small_size is None):
            raise ValueError("set both large_size and small_size for a super-resolution model, or neither")
        if self.large_size is not None and self.small_size >= self.large_size:
            raise ValueError(f"small_size ({self.small_size}) must be below large_size ({self.large_size})")
        return self

    @model_validator(mode="after")
    def _levels_and_heads_fit(self):
        """What building the UNet would otherwise find out only after the run dir was written."""
        size = self.output_size
        mult = parse_channel_mult(self.channel_mult, size)
        if size % 2 ** (len(mult) - 1):
            raise ValueError(f"channel_mult {','.join(map(str, mult))} has {len(mult)} levels, which halve the "
                             f"image {len(mult) - 1} times: the size ({size} px) must be a multiple of "
                             f"{2 ** (len(mult) - 1)}; use fewer levels")
        attended = attention_factors(self.attention_resolutions, size)
        upsample_heads = self.num_heads_upsample if self.num_heads_upsample > 0 else self.num_heads
        for level, m in enumerate(mult):
            heads = {}
            if 2 ** level in attended:
                heads.update(num_heads=self.num_heads, num_heads_upsample=upsample_heads)
            if level == len(mult) - 1:  # the middle block always attends, with num_heads
                heads["num_heads"] = self.num_heads
            for name, count in heads.items():
                if (self.num_channels * m) % count:
                    raise ValueError(f"{name} ({count}) does not divide the {self.num_channels * m} channels "
                                     f"(num_channels x {m}) of the attention at {size // 2 ** level} px")
        return self

    @property
    def is_super_res(self) -> bool:
        return self.large_size is not None

    @property
    def output_size(self) -> int:
        return self.large_size if self.is_super_res else self.image_size


class DiffusionSection(Section):
    """The diffusion process. Names and defaults are the original's flags."""

    diffusion_steps: int = Field(1000, ge=2, le=100_000, description="T, the number of diffusion steps",
        json_schema_extra={"aliases": ["timesteps", "num_timesteps", "num_diffusion_steps"]})
    noise_schedule: Literal[SCHEDULES] = Field("linear", description="beta schedule",
        json_schema_extra={"aliases": ["beta_schedule", "schedule"]})
    timestep_respacing: str = Field("", description="keep only some steps: '250', '10,15,20' or 'ddim50'")
    use_kl: bool = Field(False, description="train on L_vlb instead of the simple/hybrid loss")
    predict_xstart: bool = Field(False, description="the model predicts x_0 instead of the noise")
    rescale_timesteps: bool = Field(True, description="feed the model t * 1000/T")
    rescale_learned_sigmas: bool = Field(True, description="scale the VB term by T/1000 (L_hybrid)")
    sigma_small: bool = Field(False, description="fixed variance: the posterior's instead of beta_t")

    @model_validator(mode="after")
    def _chain_is_valid(self):
        betas = get_named_beta_schedule(self.noise_schedule, self.diffusion_steps)
        if not (betas.min() > 0 and betas.max() < 1):  # beta_T = 1 leaves no signal: every sample would be 0
            raise ValueError(f"the {self.noise_schedule} schedule with diffusion_steps {self.diffusion_steps} has "
                             f"betas up to {betas.max():.3g}; each must lie in (0, 1): use more steps")
        check_respacing(self.timestep_respacing, self.diffusion_steps, "timestep_respacing")
        return self


def check_respacing(respacing: str, diffusion_steps: int, field: str) -> None:
    """A ValueError naming ``field`` when ``respacing`` does not select steps out of ``diffusion_steps``."""
    if respacing:
        try:
            space_timesteps(diffusion_steps, respacing)
        except ValueError as err:
            raise ValueError(f"{field}: {err} (diffusion_steps is {diffusion_steps})") from None


class TrainSection(Section):
    """Optimisation, data and bookkeeping of a training run."""

    data_dir: PathText = Field(description="folder (or gs://, az:// URL) of training images")
    batch_size: PositiveInt = Field(description="GLOBAL batch, images per optimizer step over all ranks")
    microbatch: Literal["auto"] | PositiveInt | None = Field(
        None, description="images per forward pass on a rank; 'auto' = largest that fits; none = the rank's batch")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate",
        json_schema_extra={"aliases": ["learning_rate", "base_lr"]})
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_anneal_steps: int = Field(0, ge=0, description="anneal lr linearly to 0 over this many steps; 0 = constant")
    ema_rate: str = Field("0.9999", description="EMA decay rates, comma list; one fp32 copy each",
        json_schema_extra={"aliases": ["ema_decay", "ema"]})
    schedule_sampler: Literal[SCHEDULE_SAMPLERS] = Field("uniform", description="timestep sampler")
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps",
        json_schema_extra={"aliases": ["iterations", "num_steps", "total_steps", "train_steps"]})
    max_images: PositiveInt | None = Field(None, description="stop once this many images were seen")
    save_interval: PositiveInt = Field(10000, description="steps between checkpoints")
    log_interval: PositiveInt = Field(10, description="steps between log.jsonl / progress.csv rows")
    tensorboard: bool = Field(False, description="also write the logged scalars and preview grids to tensorboard/ "
                              "in the run dir (needs pip install 'idiff[tensorboard]')")
    precision: Precision = Field("fp32", description="fp32; bf16 autocast; fp16 autocast with a GradScaler")
    seed: Seed = Field(0, description="derives all noise, timesteps, data order and flips")
    resume_checkpoint: PathText = Field("", description="start from this model*.pt (a released .pt fine-tunes)")
    random_flip: bool = Field(False, description="random horizontal flips of training images")
    skip_corrupt: bool = Field(False, description="skip unreadable images (counted) instead of failing")
    num_workers: int = Field(4, ge=0, description="data loader worker processes per rank")
    keep_last: PositiveInt | None = Field(None, description="keep only the newest N checkpoints")
    keep_every: PositiveInt | None = Field(None, description="also keep every checkpoint whose step is a multiple")
    sample_grid: int = Field(16, ge=0, description="images in samples_<step>.png at each save; 0 = none")
    sample_grid_steps: PositiveInt = Field(25, description="DDIM steps for that grid")
    max_nonfinite_steps: PositiveInt = Field(20, description="stop after this many non-finite steps in a row")
    deterministic: bool = Field(False, description="torch deterministic algorithms (bitwise-repeatable runs)")
    compile: bool = Field(False, description="torch.compile the model (compile time is logged)")
    evaluate: "TrainEvaluateSection | None" = Field(None, description=(
        "evaluate every N-th checkpoint during training (section train.evaluate); none = no evaluations"))

    @field_validator("ema_rate")
    @classmethod
    def _rates(cls, value: str) -> str:
        try:
            rates = [float(r) for r in value.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {value!r}") from None
        if not all(0 < r < 1 for r in rates):
            raise ValueError(f"EMA rates must lie in (0, 1), got {value!r}")
        return ",".join(str(r) for r in rates)

    @model_validator(mode="after")
    def _ends_and_fits(self):
        if self.max_steps is None and self.max_images is None:
            if not self.lr_anneal_steps:
                raise ValueError("a run must end: set max_steps or max_images (or lr_anneal_steps)")
            self.max_steps = self.lr_anneal_steps
        if isinstance(self.microbatch, int) and self.microbatch > self.batch_size:
            raise ValueError(f"microbatch ({self.microbatch}) is larger than the global batch_size ({self.batch_size})")
        if self.lr_anneal_steps and self.total_steps > self.lr_anneal_steps:
            raise ValueError(f"lr_anneal_steps ({self.lr_anneal_steps}) is shorter than the run ({self.total_steps} "
                             f"steps): the learning rate would reach 0 at step {self.lr_anneal_steps}; set "
                             f"lr_anneal_steps to at least {self.total_steps}, or 0 for a constant rate")
        return self

    @model_validator(mode="after")
    def _evaluations_at_checkpoints(self):
        if self.evaluate is not None and self.evaluate.every % self.save_interval:
            raise ValueError(f"evaluate.every ({self.evaluate.every}) must be a multiple of save_interval "
                             f"({self.save_interval}): only checkpoints are evaluated")
        if self.evaluate is not None and self.evaluate.every > self.total_steps:
            raise ValueError(f"evaluate.every ({self.evaluate.every}) is beyond the run's {self.total_steps} steps: "
                             f"nothing would be evaluated; evaluate more often, or leave train.evaluate out")
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run: max_steps, or the steps that see max_images, whichever ends first."""
        ends = (self.max_steps, self.max_images and math.ceil(self.max_images / self.batch_size))
        return min(n for n in ends if n)

    @property
    def ema_rates(self) -> list[float]:
        return [float(r) for r in self.ema_rate.split(",") if r]


class ModelSource(Section):
    """Which weights to use: a checkpoint file, or a training run's checkpoint."""

    model_path: PathText | None = Field(None, description="a checkpoint file, e.g. a released .pt")
    from_run: PathText | None = Field(None, description="a training run dir; its spec gives the model flags")
    checkpoint: Literal["latest"] | int = Field("latest", description="with from_run: 'latest' or a step")
    use_ema: float | bool = Field(True, description="with from_run: true = the first EMA rate, a rate, or false")

    def _check_source(self, purpose: str):
        if (self.model_path is None) == (self.from_run is None):
            raise ValueError(f"{purpose} needs exactly one of model_path and from_run")


class SampleSection(ModelSource):
    """Drawing images: how many, with which sampler and steps; image i depends only on (seed, i) and the weights."""

    num_samples: PositiveInt = Field(10000, description="images to draw")
    batch_size: PositiveInt = Field(16, description="GLOBAL batch, split over ranks")
    use_ddim: bool = Field(False, description="DDIM instead of ancestral sampling")
    timestep_respacing: str = Field("", description="sampling chain, e.g. '250' or 'ddim50'; '' = all steps")
    eta: float = Field(0.0, ge=0, description="DDIM noise scale")
    sampler: Literal[tuple(SAMPLERS)] | None = Field(None, description=(
        "ancestral, ddim, or a deterministic ODE solver (dpmpp_2m, dpmpp_3m, heun, unipc, ipndm); none = "
        "ancestral, or ddim with use_ddim"))
    solver_order: int | None = Field(None, ge=1, le=4, description=(
        "unipc: its predictor's order, 1-3 (the corrector adds one; default 2); ipndm: 1-4 (default 4)"))
    unipc_variant: Literal[UNIPC_VARIANTS] = Field("bh2", description="unipc's B(h): bh1 = h, bh2 = e^h - 1")
    steps: PositiveInt | None = Field(None, description=(
        "model evaluations per image; ancestral/ddim: the same as timestep_respacing 'N'; none = one per step of "
        "the chain"))
    spacing: Literal[SPACINGS] | None = Field(None, description=(
        "where an ODE solver's steps go: IDDPM's evenly spaced timesteps, uniform in log-SNR, or Karras rho=7; "
        "none = logsnr_uniform with steps, else the chain's own steps (ancestral and ddim: time_uniform only)"))
    schedule: str | None = Field(None, description=(
        "an ODE solver's chain times from `idiff tune-schedule` (a SCHEDULE.json), instead of spacing; only for "
        "the model, sampler and steps it was tuned for"))
    clip_denoised: bool = Field(True, description="clip predicted x_0 to [-1, 1]")
    class_labels: Literal["random", "balanced"] | list[int] = Field(
        "random", description="class-conditional models: 'random', 'balanced' (round robin) or a list cycled")
    seed: Seed = Field(0, description="sample i depends on (seed, i) only")
    seed_sets: PositiveInt = Field(1, description=(
        "draw this many disjoint sets of num_samples (set k: indices k*num_samples to (k+1)*num_samples - 1); "
        "evaluating them reports each set's score, their mean, std and minimum"))
    base_samples: PathText | None = Field(None, description="super-resolution: .npz of low-res images (and labels)")
    precision: Precision = Field("fp32", description="fp32, or bf16/fp16 autocast")

    @field_validator("timestep_respacing")
    @classmethod
    def _respacing_syntax(cls, value: str) -> str:
        if value:
            parse_respacing(value)  # whether the steps fit is known with the model's diffusion_steps
        return value

    @field_validator("sampler")
    @classmethod
    def _one_sampler(cls, value, info):
        if info.data.get("use_ddim") and value not in (None, "ddim"):
            raise ValueError(f"use_ddim: true means sampler ddim, not {value}; set one of them")
        if value in ODE_SAMPLERS and info.data.get("eta"):
            raise ValueError(f"{value} draws no noise: eta (DDIM's noise scale) must be 0, got {info.data['eta']}")
        return value

    @field_validator("solver_order")
    @classmethod
    def _order_of_a_solver(cls, value, info):
        sampler = info.data.get("sampler")
        if value is not None and value > MAX_SOLVER_ORDER.get(sampler, 0):
            if sampler not in MAX_SOLVER_ORDER:
                raise ValueError(f"solver_order is for {' and '.join(MAX_SOLVER_ORDER)}, not {sampler}")
            raise ValueError(f"{sampler} takes orders 1 to {MAX_SOLVER_ORDER[sampler]}, got {value}")
        return value

    @field_validator("steps")
    @classmethod
    def _enough_steps(cls, value, info):
        if value is None:
            return value
        if info.data.get("timestep_respacing"):
            raise ValueError("steps and timestep_respacing both choose the sampling steps; set one of them")
        sampler = info.data.get("sampler") or ("ddim" if info.data.get("use_ddim") else "ancestral")
        if value < MIN_STEPS[sampler]:
            raise ValueError(f"{sampler} needs at least {MIN_STEPS[sampler]} steps to take one step of its order, "
                             f"got {value}")
        return value

    @field_validator("spacing")
    @classmethod
    def _spacing_of_an_ode_sampler(cls, value, info):
        sampler = info.data.get("sampler") or ("ddim" if info.data.get("use_ddim") else "ancestral")
        if value not in (None, "time_uniform") and sampler not in ODE_SAMPLERS:
            raise ValueError(f"{value} spacing is for the ODE solvers ({', '.join(ODE_SAMPLERS)}); {sampler} takes "
                             f"the chain's own steps (time_uniform)")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule_of_an_ode_sampler(cls, value, info):
        sampler = info.data.get("sampler")
        if value is not None and (sampler not in ODE_SAMPLERS or not info.data.get("steps")):
            raise ValueError(f"a tuned schedule is for an ODE solver ({', '.join(ODE_SAMPLERS)}) with steps, the "
                             f"ones it was tuned for")
        if value is not None and info.data.get("spacing"):
            raise ValueError("schedule and spacing both place the steps; set one of them")
        return value

    @model_validator(mode="after")
    def _source(self):
        self._check_source("sampling")
        if self.sampler == "ddim" and not self.use_ddim:
            if "use_ddim" in self.model_fields_set:
                raise ValueError("use_ddim: false contradicts sampler: ddim; set one of them")
            self.use_ddim = True  # the legacy field says what sampler says, so a dumped spec reads back the same
        return self

    @property
    def total_samples(self) -> int:
        """Images the job draws: every seed set's."""
        return self.num_samples * self.seed_sets

    @property
    def sampler_name(self) -> str:
        """The sampler: ``sampler``, else what ``use_ddim`` says."""
        return self.sampler or ("ddim" if self.use_ddim else "ancestral")

    @property
    def chain_respacing(self) -> str:
        """The respacing of the chain the sampler runs on. Ancestral and DDIM step through a respaced chain, so
        their ``steps`` N is respacing "N"; the ODE solvers place their steps on the whole chain themselves."""
        if self.steps and self.sampler_name not in ODE_SAMPLERS:
            return str(self.steps)
        return self.timestep_respacing

    @property
    def sampler_options(self) -> dict:
        """The options of ``samplers.SAMPLERS[sampler_name]`` besides the common ones."""
        if self.sampler_name == "ddim":
            return {"eta": self.eta}
        if self.sampler_name in ODE_SAMPLERS:
            options = {"steps": self.steps, "spacing": resolve_spacing(self.spacing, self.steps)}
            if self.solver_order is not None:
                options["order"] = self.solver_order
            if self.sampler_name == "unipc":
                options["variant"] = self.unipc_variant
            return options
        return {}

    @property
    def sampling(self) -> str:
        """How images are drawn, in words: 'dpmpp_2m 20 steps logsnr_uniform', 'ddim ddim50', 'ancestral all steps'."""
        chain = f"{self.steps} steps" if self.steps else self.timestep_respacing or "all steps"
        spacing = f"schedule {self.schedule}" if self.schedule else self.sampler_options.get("spacing")
        return f"{self.sampler_name} {chain}" + (f" {spacing}" if spacing else "")


Metric = Literal["nll", "fid", "sfid", "inception_score", "precision_recall"]


class EvaluateSection(ModelSource):
    """``nll`` runs a model over real images; the other metrics compare two image sets."""

    metrics: list[Metric] = Field(default_factory=lambda: ["nll"], min_length=1, description=(
        "which metrics to compute, a list or 'nll,fid'; the default is what the original's image_nll.py computes"))
    data_dir: PathText | None = Field(None, description="nll: images to evaluate")
    num_samples: PositiveInt = Field(1000, description="nll: images to evaluate")
    batch_size: PositiveInt = Field(16, description="nll: GLOBAL batch")
    clip_denoised: bool = Field(True, description="nll: clip predicted x_0")
    seed: Seed = Field(0, description="nll: noise seed")
    samples: PathText | None = Field(None, description="generated images: a .npz or a sample run dir")
    reference: PathText | None = Field(None, description=(
        "real images (a folder or a .npz batch), or a statistics file in guided-diffusion's reference-batch layout "
        "(mu, sigma[, mu_s, sigma_s, arr_0]; idiff evaluate --make-reference writes one)"))
    inception_weights: PathText | None = Field(None, description="pt_inception-2015-12-05 weights file (offline nodes)")

    @field_validator("metrics", mode="before")
    @classmethod
    def _comma_list(cls, value):
        """The original's flag form ``--metrics nll,fid`` (and YAML's ``metrics: nll``) is a string."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _inputs_for_metrics(self):
        if "nll" in self.metrics:
            self._check_source("nll")
            if not self.data_dir:
                raise ValueError("nll needs data_dir")
        if set(self.metrics) - {"nll"} and not (self.samples and self.reference):
            raise ValueError("fid / sfid / inception_score / precision_recall need samples and reference")
        return self


class TrainEvaluateSection(Section):
    """train.evaluate: the evaluate section without its weights source, run on checkpoints during training.

    At every ``every``-th step's complete checkpoint its (EMA) weights are evaluated; FID / IS / PR first
    draw images from them as the ``sample`` section says."""

    every: PositiveInt = Field(description="evaluate the checkpoint of every N-th step; a multiple of save_interval")
    use_ema: float | bool = ModelSource.model_fields["use_ema"]
    metrics: list[Metric] = EvaluateSection.model_fields["metrics"]
    data_dir: PathText | None = EvaluateSection.model_fields["data_dir"]
    num_samples: PositiveInt = EvaluateSection.model_fields["num_samples"]
    batch_size: PositiveInt = EvaluateSection.model_fields["batch_size"]
    clip_denoised: bool = EvaluateSection.model_fields["clip_denoised"]
    seed: Seed = EvaluateSection.model_fields["seed"]
    reference: PathText | None = EvaluateSection.model_fields["reference"]
    inception_weights: PathText | None = EvaluateSection.model_fields["inception_weights"]
    sample: dict = Field(default_factory=dict, description=(
        "fid / inception_score / precision_recall: the sample section of the images drawn for them, without "
        "its weights source (num_samples, batch_size, sampler, steps, ...)"))
    _comma_list = field_validator("metrics", mode="before")(EvaluateSection._comma_list.__func__)

    def evaluate_section(self, from_run: str, checkpoint: int, samples: str | None) -> EvaluateSection:
        """The evaluate section of the evaluation of ``checkpoint`` of the run ``from_run``."""
        fields = self.model_dump(exclude={"every", "sample"})
        return EvaluateSection(**fields, from_run=from_run, checkpoint=checkpoint, samples=samples)

    def sample_section(self, from_run: str, checkpoint: int) -> SampleSection:
        """The sample section of the images that FID / IS / PR of ``checkpoint`` compare."""
        return SampleSection(**self.sample, from_run=from_run, checkpoint=checkpoint, use_ema=self.use_ema)

    @property
    def needs_samples(self) -> bool:
        return bool(set(self.metrics) - {"nll"})

    @model_validator(mode="after")
    def _complete(self):
        source = {"model_path", "from_run", "checkpoint", "use_ema"} & set(self.sample)
        if source:
            raise ValueError(f"sample: {', '.join(sorted(source))} is not set here: the weights are each "
                             f"evaluated checkpoint's (use_ema chooses which)")
        if self.needs_samples and not self.reference:
            raise ValueError(f"{', '.join(m for m in self.metrics if m != 'nll')} needs reference (real images)")
        self.evaluate_section("(this run)", 0, "(drawn)" if self.needs_samples else None)
        if self.needs_samples:
            self.sample_section("(this run)", 0)
        return self


TrainSection.model_rebuild()


class Job(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name")
    run_dir: PathText | None = Field(None, description="outputs; default $OPENAI_LOGDIR, else runs/<name>")
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _run_dir_apart_from_inputs(self):
        if not self.run_dir:
            self.run_dir = os.environ.get("OPENAI_LOGDIR") or os.path.join("runs", self.name)
        for field, path in self.input_paths().items():
            if _inside(path, self.run_dir):
                raise ValueError(f"{field} ({brief(path)}) lies in this job's own run_dir {brief(self.run_dir)}: a "
                                 f"job writes its run dir and reads its inputs from elsewhere; choose another run_dir")
        return self

    def input_paths(self) -> dict[str, str]:
        """Field -> path of what the job reads (the fields that are set)."""
        return {}

    # Where a run ends is not part of what it computes: a training run may be extended (train.max_steps raised)
    # and continues as if it had been asked for the longer run from the start.
    RUN_END: ClassVar[dict] = {}

    def run_hash(self) -> str:
        """Identity of the computation: everything but where it runs, which resources it gets and where it ends."""
        return self._hash(exclude={"resources": True, "run_dir": True, **self.RUN_END})

    def run_hashes(self) -> tuple[str, str]:
        """run_hash, and the hash that checkpoints of idiff versions before extensible runs hold (with the end)."""
        return self.run_hash(), self._hash(exclude={"resources", "run_dir"})

    def _hash(self, exclude) -> str:
        body = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class TrainJob(Job):
    RUN_END: ClassVar[dict] = {"train": {"max_steps", "max_images"}}
    kind: Literal["train"]
    model: ModelSection = Field(default_factory=ModelSection)
    diffusion: DiffusionSection = Field(default_factory=DiffusionSection)
    train: TrainSection

    def input_paths(self) -> dict[str, str]:
        paths = {"train.data_dir": self.train.data_dir, "train.resume_checkpoint": self.train.resume_checkpoint}
        if self.train.evaluate is not None:
            paths.update({f"train.evaluate.{k}": getattr(self.train.evaluate, k)
                          for k in ("data_dir", "reference", "inception_weights")})
        return {field: path for field, path in paths.items() if path}

    @model_validator(mode="after")
    def _fits_in_memory(self):
        check_first_allocation(self.model, self.train.batch_size, self.resources.world_size, "train.batch_size")
        return self


class ModelJob(Job):
    """A job that loads weights; ``model``/``diffusion`` may be left out with ``from_run``."""

    model: ModelSection | None = None
    diffusion: DiffusionSection | None = None

    @property
    def source(self) -> ModelSource:
        raise NotImplementedError

    @model_validator(mode="after")
    def _architecture_known(self):
        if self.source.model_path and self.model is None:
            raise ValueError(f"{self.kind}.model_path needs the model section (the flags the checkpoint was trained "
                             "with)")
        if self.model is not None:
            section = getattr(self, self.kind)
            check_first_allocation(self.model, section.batch_size, self.resources.world_size,
                                   f"{self.kind}.batch_size")
        return self

    def input_paths(self) -> dict[str, str]:
        section = getattr(self, self.kind)
        fields = ("model_path", "from_run", *(("base_samples",) if self.kind == "sample" else
                                              ("data_dir", "samples", "reference", "inception_weights")))
        return {f"{self.kind}.{k}": getattr(section, k) for k in fields if getattr(section, k)}


class SampleJob(ModelJob):
    kind: Literal["sample"]
    sample: SampleSection

    @model_validator(mode="after")
    def _respacing_fits(self):
        """diffusion_steps is the spec's, or with model_path alone the default; a from_run without a diffusion
        section takes the run's, checked when the weights are resolved."""
        if self.diffusion is not None or self.sample.model_path:
            steps = (self.diffusion or DiffusionSection()).diffusion_steps
            check_respacing(self.sample.timestep_respacing, steps, "sample.timestep_respacing")
        return self

    @property
    def source(self) -> ModelSource:
        return self.sample


class EvaluateJob(ModelJob):
    kind: Literal["evaluate"]
    evaluate: EvaluateSection

    @property
    def source(self) -> ModelSource:
        return self.evaluate


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies in it (local paths compared absolute; URLs as written)."""
    if "://" not in path and "://" not in folder:
        path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder.rstrip("/") or path.startswith(folder.rstrip("/") + "/")


def physical_memory() -> int | None:
    """Bytes of memory of this machine; None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def first_allocation(model: ModelSection, batch_size: int, world_size: int) -> int:
    """A rough lower bound of the bytes a rank allocates first, in float32: the UNet's 3x3 convolution weights
    (two per residual block, encoder and decoder) and the rank's batch of images with the first layer's
    activations (num_channels per pixel). The real need is several times more; this catches sizes that cannot
    run anywhere, not sizes that are merely too large for a GPU."""
    size = model.output_size
    mult = parse_channel_mult(model.channel_mult, size)
    weights = sum(2 * (2 * model.num_res_blocks + 1) * 9 * (model.num_channels * m) ** 2 for m in mult)
    images = math.ceil(batch_size / world_size) * (3 + model.num_channels) * size * size
    return 4 * (weights + images)


def check_first_allocation(model: ModelSection, batch_size: int, world_size: int, field: str) -> None:
    memory = physical_memory()
    need = first_allocation(model, batch_size, world_size)
    if memory is not None and need > memory:
        raise ValueError(f"{field} {batch_size} with model.image_size {model.output_size} and num_channels "
                         f"{model.num_channels}: a rank's first allocation alone needs about {need / 2**30:,.1f} GiB, "
                         f"more than this machine's {memory / 2**30:.1f} GiB of memory; use a smaller batch or model")


JobSpec = Annotated[TrainJob | SampleJob | EvaluateJob, Field(discriminator="kind")]
KINDS = {"train": TrainJob, "sample": SampleJob, "evaluate": EvaluateJob}
