"""The ``resources`` section: what the scheduler is asked for, and the container every rank runs in.

Its values reach sbatch scripts and command lines, so they are checked as words, not only as values.
"""

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, PositiveInt, field_validator, model_validator

from ..errors import brief
from .section import Section


# Values of these sections reach sbatch scripts and command lines. A newline there would start a new
# shell command, so control characters are refused everywhere; submitit and idiff quote the rest.
def refuse_control_characters(value: str) -> str:
    bad = sorted({repr(c) for c in value if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(f"control characters ({', '.join(bad)}) are not allowed: the value reaches a Slurm script "
                         "or command line")
    return value


ScriptText = Annotated[str, AfterValidator(refuse_control_characters)]
# Image names and mount paths go onto docker/apptainer/srun command lines and into Pyxis's comma list:
# only characters that no shell or option parser treats specially, and no leading '-' (an option).
_IMAGE = re.compile(r"[A-Za-z0-9_./@#+=][A-Za-z0-9_./@#+=:-]*")
MOUNT_PATH = re.compile(r"/[A-Za-z0-9_./@+=-]*")


def _one_word(value: str, what: str, pattern: re.Pattern, allowed: str) -> str:
    refuse_control_characters(value)
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r}: only letters, digits and {allowed} are allowed (no spaces, quotes or "
                         "other shell characters, no leading -)")
    return value


class ContainerSection(Section):
    """Runs every rank of a Slurm job in a container (idiff-submit and slurm/*.sbatch); see docker/README.md.

    The working directory and the run dir are always mounted at their own paths."""

    image: str = Field(description="docker/podman: image name; apptainer: .sif file or URI; pyxis: enroot image")
    runtime: Literal["docker", "podman", "apptainer", "pyxis"] = Field(
        "docker", description="docker/podman `run`, `apptainer exec`, or srun's Pyxis `--container-image`")
    mounts: list[str] = Field(default_factory=list, description=(
        "more HOST[:CONTAINER][:ro] bind mounts (absolute paths), e.g. data sets"))

    @field_validator("image")
    @classmethod
    def _image_is_one_word(cls, value: str) -> str:
        return _one_word(value, "image", _IMAGE, "_./@#+=-:")

    @field_validator("mounts")
    @classmethod
    def _mounts_are_paths(cls, mounts: list[str]) -> list[str]:
        for mount in mounts:
            refuse_control_characters(mount)
            parts = mount.split(":")
            if parts[-1] in ("ro", "rw") and len(parts) > 1:
                parts = parts[:-1]
            if len(parts) > 2:
                raise ValueError(f"mount {mount!r}: expected HOST[:CONTAINER][:ro]")
            for path in parts:
                if not path.startswith("/"):
                    raise ValueError(f"mount {mount!r}: {path!r} is not an absolute path")
                _one_word(path, f"mount {mount!r}: path", MOUNT_PATH, "_./@+=-")
        return mounts


HANG_TIMEOUT_FLOOR_S = 10.0  # shorter would end ranks in legitimate pauses; tests use this to stay fast
_DURATION = re.compile(r"(?P<number>\d+(\.\d*)?|\.\d+)\s*(?P<unit>s|m|h)?")
_UNIT_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600}


def duration_seconds(value):
    """Seconds from a number or a duration such as ``90s``, ``10m``, ``1.5h`` (None stays None)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected seconds or a duration such as 90s, 10m or 1h, got {brief(value)}")
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if isinstance(value, str) and match is None:
        raise ValueError(f"{brief(value)} is not a duration: write seconds or a duration such as 90s, 10m or 1h")
    seconds = float(value) if match is None else float(match["number"]) * _UNIT_SECONDS[match["unit"]]
    if not seconds >= HANG_TIMEOUT_FLOOR_S:
        raise ValueError(f"{brief(value)} is below the floor of {HANG_TIMEOUT_FLOOR_S:g} s")
    return seconds


class JobResources(Section):
    """What the scheduler is asked for; ignored by local runs."""

    nodes: PositiveInt = Field(1, description="nodes")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node, one rank each; 0 = CPU ranks")
    tasks_per_node: PositiveInt = Field(1, description="ranks per node when gpus_per_node is 0")
    cpus_per_task: PositiveInt = Field(8, description="CPU cores per rank")
    mem_gb: PositiveInt | None = Field(None, description="memory per node, GB")
    timeout_min: PositiveInt = Field(60 * 24, description="wall-clock limit of one Slurm job, minutes")
    partition: ScriptText | None = Field(None, description="Slurm partition")
    account: ScriptText | None = Field(None, description="Slurm account")
    qos: ScriptText | None = Field(None, description="Slurm QOS")
    constraint: ScriptText | None = Field(None, description="Slurm node constraint")
    signal_delay_s: PositiveInt = Field(120, description="USR2 this long before the time limit, seconds")
    max_requeues: int = Field(10, ge=0, description=(
        "requeues after preemption, timeout, a hang or a crash before giving up (docs/faults.md)"))
    hang_timeout: Annotated[float | None, BeforeValidator(duration_seconds)] = Field(None, description=(
        f"a rank that makes no progress (a step, a shard) for this long dumps its stacks and ends: seconds or a "
        f"duration (90s, 10m), at least {HANG_TIMEOUT_FLOOR_S:g} s; none = 10 x the slowest step so far, at "
        f"least 10 minutes (docs/faults.md)"))
    container: ContainerSection | None = Field(None, description="run the ranks in this container (section below)")
    slurm_extra: dict[str, str] = Field(
        default_factory=dict, description="further sbatch options, e.g. {mail-user: me@example.org}")

    @field_validator("slurm_extra")
    @classmethod
    def _sbatch_options(cls, options: dict[str, str]) -> dict[str, str]:
        for key, value in options.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
                raise ValueError(f"{key!r} is not an sbatch option name (letters, digits, - and _, e.g. mail-user)")
            try:
                refuse_control_characters(value)
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        return options

    @model_validator(mode="before")
    @classmethod
    def _container_image_means_pyxis(cls, data):
        """Specs written before the container section named a Pyxis image as ``container_image``."""
        if isinstance(data, dict) and "container_image" in data:
            data = dict(data)
            image = data.pop("container_image")
            if image is not None:
                if data.get("container") is not None:
                    raise ValueError("container_image is the old spelling of container: {image: ..., runtime: pyxis}; "
                                     "set only container")
                data["container"] = {"image": image, "runtime": "pyxis"}
        return data

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


class Resources(JobResources):
    """What the scheduler is asked for; ignored by local runs."""

    evaluate: JobResources | None = Field(None, description=(
        "the jobs of train.evaluate under Slurm; none = these resources on one node"))

    def for_evaluations(self) -> "Resources":
        """The resources of one evaluation job during training."""
        return Resources(**(self.evaluate or self.model_copy(update={"nodes": 1})).model_dump(exclude={"evaluate"}))
