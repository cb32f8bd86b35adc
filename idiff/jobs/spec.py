"""Job specs: the single source of truth for what a run is.

The ``model`` and ``diffusion`` sections are exactly the keyword arguments of
``create_model_and_diffusion`` (or ``sr_create_model_and_diffusion`` when ``large_size`` is set).
CLI flags, ``--help``, ``idiff spec --docs`` and error messages are all generated from these models.
"""

import hashlib
import json
import os
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from ..diffusion.schedules import SCHEDULES
from ..diffusion.timestep_sampler import SCHEDULE_SAMPLERS

Precision = Literal["fp32", "bf16", "fp16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """The UNet. Names and defaults are the original's flags."""

    image_size: PositiveInt = Field(64, description="side of the square images, px")
    num_channels: PositiveInt = Field(128, description="channels at the first resolution level")
    num_res_blocks: PositiveInt = Field(2, description="residual blocks per resolution level")
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
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"expected comma-separated positive integers, got {value!r}")
        return ",".join(parts)

    @model_validator(mode="after")
    def _super_res_sizes(self):
        if (self.large_size is None) != (self.small_size is None):
            raise ValueError("set both large_size and small_size for a super-resolution model, or neither")
        if self.large_size is not None and self.small_size >= self.large_size:
            raise ValueError(f"small_size ({self.small_size}) must be below large_size ({self.large_size})")
        return self

    @property
    def is_super_res(self) -> bool:
        return self.large_size is not None

    @property
    def output_size(self) -> int:
        return self.large_size if self.is_super_res else self.image_size


class DiffusionSection(Section):
    """The diffusion process. Names and defaults are the original's flags."""

    diffusion_steps: PositiveInt = Field(1000, description="T, the number of diffusion steps")
    noise_schedule: Literal[SCHEDULES] = Field("linear", description="beta schedule")
    timestep_respacing: str = Field("", description="keep only some steps: '250', '10,15,20' or 'ddim50'")
    use_kl: bool = Field(False, description="train on L_vlb instead of the simple/hybrid loss")
    predict_xstart: bool = Field(False, description="the model predicts x_0 instead of the noise")
    rescale_timesteps: bool = Field(True, description="feed the model t * 1000/T")
    rescale_learned_sigmas: bool = Field(True, description="scale the VB term by T/1000 (L_hybrid)")
    sigma_small: bool = Field(False, description="fixed variance: the posterior's instead of beta_t")


class TrainSection(Section):
    """Optimisation, data and bookkeeping of a training run."""

    data_dir: str = Field(description="folder (or gs://, az:// URL) of training images")
    batch_size: PositiveInt = Field(description="GLOBAL batch, images per optimizer step over all ranks")
    microbatch: Literal["auto"] | PositiveInt | None = Field(
        None, description="images per forward pass on a rank; 'auto' = largest that fits; none = the rank's batch")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    lr_anneal_steps: int = Field(0, ge=0, description="anneal lr linearly to 0 over this many steps; 0 = constant")
    ema_rate: str = Field("0.9999", description="EMA decay rates, comma list; one fp32 copy each")
    schedule_sampler: Literal[SCHEDULE_SAMPLERS] = Field("uniform", description="timestep sampler")
    max_steps: PositiveInt | None = Field(None, description="stop after this many optimizer steps")
    max_images: PositiveInt | None = Field(None, description="stop once this many images were seen")
    save_interval: PositiveInt = Field(10000, description="steps between checkpoints")
    log_interval: PositiveInt = Field(10, description="steps between log.jsonl / progress.csv rows")
    precision: Precision = Field("fp32", description="fp32; bf16 autocast; fp16 autocast with a GradScaler")
    seed: int = Field(0, ge=0, description="derives all noise, timesteps, data order and flips")
    resume_checkpoint: str = Field("", description="start from this model*.pt (a released .pt fine-tunes)")
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
        return self

    @property
    def ema_rates(self) -> list[float]:
        return [float(r) for r in self.ema_rate.split(",") if r]


class ModelSource(Section):
    """Which weights to use: a checkpoint file, or a training run's checkpoint."""

    model_path: str | None = Field(None, description="a checkpoint file, e.g. a released .pt")
    from_run: str | None = Field(None, description="a training run dir; its spec gives the model flags")
    checkpoint: Literal["latest"] | int = Field("latest", description="with from_run: 'latest' or a step")
    use_ema: float | bool = Field(True, description="with from_run: true = the first EMA rate, a rate, or false")

    def _check_source(self, purpose: str):
        if (self.model_path is None) == (self.from_run is None):
            raise ValueError(f"{purpose} needs exactly one of model_path and from_run")


class SampleSection(ModelSource):
    num_samples: PositiveInt = Field(10000, description="images to draw")
    batch_size: PositiveInt = Field(16, description="GLOBAL batch, split over ranks")
    use_ddim: bool = Field(False, description="DDIM instead of ancestral sampling")
    timestep_respacing: str = Field("", description="sampling chain, e.g. '250' or 'ddim50'; '' = all steps")
    eta: float = Field(0.0, ge=0, description="DDIM noise scale")
    clip_denoised: bool = Field(True, description="clip predicted x_0 to [-1, 1]")
    class_labels: Literal["random", "balanced"] | list[int] = Field(
        "random", description="class-conditional models: 'random', 'balanced' (round robin) or a list cycled")
    seed: int = Field(0, ge=0, description="sample i depends on (seed, i) only")
    base_samples: str | None = Field(None, description="super-resolution: .npz of low-res images (and labels)")
    precision: Precision = Field("fp32", description="fp32, or bf16/fp16 autocast")

    @model_validator(mode="after")
    def _source(self):
        self._check_source("sampling")
        return self


Metric = Literal["nll", "fid", "inception_score", "precision_recall"]


class EvaluateSection(ModelSource):
    """``nll`` runs a model over real images; the other metrics compare two image sets."""

    metrics: list[Metric] = Field(description="which metrics to compute")
    data_dir: str | None = Field(None, description="nll: images to evaluate")
    num_samples: PositiveInt = Field(1000, description="nll: images to evaluate")
    batch_size: PositiveInt = Field(16, description="nll: GLOBAL batch")
    clip_denoised: bool = Field(True, description="nll: clip predicted x_0")
    seed: int = Field(0, ge=0, description="nll: noise seed")
    samples: str | None = Field(None, description="generated images: a .npz or a sample run dir")
    reference: str | None = Field(None, description="real images: a folder or a .npz batch")
    inception_weights: str | None = Field(None, description="pt_inception-2015-12-05 weights file (offline nodes)")

    @model_validator(mode="after")
    def _inputs_for_metrics(self):
        if "nll" in self.metrics:
            self._check_source("nll")
            if not self.data_dir:
                raise ValueError("nll needs data_dir")
        if set(self.metrics) - {"nll"} and not (self.samples and self.reference):
            raise ValueError("fid / inception_score / precision_recall need samples and reference")
        return self


class Resources(Section):
    """What the scheduler is asked for; ignored by local runs."""

    nodes: PositiveInt = Field(1, description="nodes")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node, one rank each; 0 = CPU ranks")
    tasks_per_node: PositiveInt = Field(1, description="ranks per node when gpus_per_node is 0")
    cpus_per_task: PositiveInt = Field(8, description="CPU cores per rank")
    mem_gb: PositiveInt | None = Field(None, description="memory per node, GB")
    timeout_min: PositiveInt = Field(60 * 24, description="wall-clock limit of one Slurm job, minutes")
    partition: str | None = Field(None, description="Slurm partition")
    account: str | None = Field(None, description="Slurm account")
    qos: str | None = Field(None, description="Slurm QOS")
    constraint: str | None = Field(None, description="Slurm node constraint")
    signal_delay_s: PositiveInt = Field(120, description="USR2 this long before the time limit, seconds")
    max_requeues: int = Field(10, ge=0, description="requeues after preemption or timeout before giving up")
    container_image: str | None = Field(None, description="Pyxis/enroot image passed to srun")
    slurm_extra: dict[str, str] = Field(default_factory=dict, description="further sbatch options")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


class Job(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name")
    run_dir: str | None = Field(None, description="outputs; default $OPENAI_LOGDIR, else runs/<name>")
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _default_run_dir(self):
        if not self.run_dir:
            self.run_dir = os.environ.get("OPENAI_LOGDIR") or os.path.join("runs", self.name)
        return self

    def model_flags(self) -> dict:
        """The keyword arguments of create_model_and_diffusion for this job (a missing diffusion
        section means the original's defaults)."""
        return {**self.model.model_dump(), **(self.diffusion or DiffusionSection()).model_dump()}

    def run_hash(self) -> str:
        """Identity of the computation: everything but where it runs and which resources it gets."""
        body = self.model_dump(mode="json", exclude={"resources", "run_dir"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class TrainJob(Job):
    kind: Literal["train"]
    model: ModelSection = Field(default_factory=ModelSection)
    diffusion: DiffusionSection = Field(default_factory=DiffusionSection)
    train: TrainSection


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
            raise ValueError(f"{self.kind}.model_path needs the model section (the flags the checkpoint was trained with)")
        return self


class SampleJob(ModelJob):
    kind: Literal["sample"]
    sample: SampleSection

    @property
    def source(self) -> ModelSource:
        return self.sample


class EvaluateJob(ModelJob):
    kind: Literal["evaluate"]
    evaluate: EvaluateSection

    @property
    def source(self) -> ModelSource:
        return self.evaluate


JobSpec = Annotated[Union[TrainJob, SampleJob, EvaluateJob], Field(discriminator="kind")]
KINDS = {"train": TrainJob, "sample": SampleJob, "evaluate": EvaluateJob}
