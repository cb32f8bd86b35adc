"""The original's command-line flags (image_train.py, image_sample.py, image_nll.py, super_res_*.py).

Every flag is a field of a spec section; the parser, its help and the mapping are generated from
the Pydantic models, so a new spec field is a new flag with no second list to update.
"""

import argparse
import hashlib
import json
import typing
import warnings

from pydantic.fields import FieldInfo

from .load import SpecError
from .schema import DiffusionSection, EvaluateSection, ModelSection, SampleSection, TrainSection

SECTIONS = {"train": TrainSection, "sample": SampleSection, "evaluate": EvaluateSection}

# Flags of the original that have no field of their own.
LEGACY_FLAGS = {
    "train": {
        "use_fp16": "train with fp16 autocast and a GradScaler (= precision fp16)",
        "fp16_scale_growth": "accepted and ignored: torch's GradScaler adapts the loss scale itself",
    },
}


def str2bool(value: str) -> bool:
    """The original's boolean parsing: yes/true/t/y/1 and no/false/f/n/0."""
    lowered = str(value).lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def add_dict_to_argparser(parser: argparse.ArgumentParser, defaults: dict) -> None:
    """One ``--name`` option per entry, parsed as the default's type (booleans by str2bool; a None default
    takes the string given), as the original's scripts build their parsers."""
    for name, default in defaults.items():
        if isinstance(default, bool):
            parse = str2bool
        elif default is None:
            parse = str
        else:
            parse = type(default)
        parser.add_argument(f"--{name}", default=default, type=parse)


def args_to_dict(args: argparse.Namespace, names) -> dict:
    """The parsed values of ``names``, e.g. ``model_and_diffusion_defaults().keys()``."""
    return {name: getattr(args, name) for name in names}


def flag_fields(kind: str) -> dict[str, tuple[str, FieldInfo]]:
    """Flag name -> (section, field). The job's own section wins a name clash (sample.timestep_respacing)."""
    fields = {}
    for section, cls in (("model", ModelSection), ("diffusion", DiffusionSection), (kind, SECTIONS[kind])):
        fields.update({name: (section, field) for name, field in cls.model_fields.items()})
    return fields


def _is(annotation, kind) -> bool:
    return annotation is kind or kind in typing.get_args(annotation) or typing.get_origin(annotation) is kind


def _convert(field: FieldInfo, raw: str):
    annotation = field.annotation
    if annotation is bool:
        return str2bool(raw)
    if raw.lower() in ("none", "null") and _is(annotation, type(None)):
        return None
    if any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation))) and "," in raw:
        return [part.strip() for part in raw.split(",")]
    return raw


def add_flag_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    group = parser.add_argument_group(
        "flags of the original scripts (override the spec; the job's values are validated as in YAML)")
    for name, (section, field) in flag_fields(kind).items():
        default = "required" if field.is_required() else field.get_default(call_default_factory=True)
        group.add_argument(f"--{name}", dest=f"flag.{section}.{name}", default=argparse.SUPPRESS, metavar="V",
                           help=f"{field.description} [{section}.{name}; default: {default}]".replace("%", "%%"))
    for name, help_text in LEGACY_FLAGS.get(kind, {}).items():
        group.add_argument(f"--{name}", dest=f"legacy.{name}", default=argparse.SUPPRESS, metavar="V", help=help_text)


def flag_values(namespace: argparse.Namespace, kind: str) -> dict:
    """The flags given on the command line as a nested spec fragment."""
    fields = flag_fields(kind)
    nested: dict = {}
    for dest, raw in vars(namespace).items():
        try:
            if dest.startswith("flag."):
                _, section, name = dest.split(".", 2)
                nested.setdefault(section, {})[name] = _convert(fields[name][1], raw)
            elif dest.startswith("legacy."):
                _apply_legacy(nested, dest.removeprefix("legacy."), raw)
        except argparse.ArgumentTypeError as err:
            raise SpecError(f"--{dest.rsplit('.', 1)[-1]}: {err}") from None
    if kind == "train" and nested.get("train", {}).get("microbatch") in ("-1", "0"):
        nested["train"]["microbatch"] = None  # the original's "no microbatching"
    return nested


def _apply_legacy(nested, name, raw):
    if name == "use_fp16" and str2bool(raw):
        nested.setdefault("train", {})["precision"] = "fp16"
    elif name == "fp16_scale_growth":
        warnings.warn("--fp16_scale_growth is ignored: torch.amp.GradScaler grows the loss scale itself", stacklevel=2)


def merge(base: dict, fragment: dict) -> dict:
    out = dict(base)
    for key, value in fragment.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def spec_from_flags(kind: str, fragment: dict) -> dict:
    """A whole spec from flags alone; its name is a digest of them, so re-running the same command
    (on every rank of an mpiexec launch, or after a crash) finds the same run_dir."""
    data = {"kind": kind, "model": {}, "diffusion": {}, kind: {}, **fragment}
    if "name" not in data:
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
        data["name"] = f"{kind}-{digest}"
    return data
