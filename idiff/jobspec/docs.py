"""The spec reference (docs/spec.md), generated from the Pydantic models."""

import typing

from pydantic import BaseModel

from .resources import ContainerSection, Resources
from .schema import DiffusionSection, EvaluateSection, ModelSection, SampleSection, TrainEvaluateSection, TrainSection

SECTIONS = [
    ("model", ModelSection), ("diffusion", DiffusionSection), ("train", TrainSection),
    ("train.evaluate", TrainEvaluateSection),
    ("sample", SampleSection), ("evaluate", EvaluateSection), ("resources", Resources),
    ("resources.container", ContainerSection),
]


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if args and typing.get_origin(annotation) is not list:
        return " \\| ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and not issubclass(annotation, BaseModel):
        return annotation.__name__ if not args else str(annotation)
    return str(annotation).replace("typing.", "")


def spec_reference() -> str:
    lines = [
        "# Job spec reference",
        "",
        "Generated from `idiff/jobspec/schema.py` by `idiff spec --docs`; do not edit by hand.",
        "A spec has `kind` (train | sample | evaluate), `name`, optional `run_dir` (default `$OPENAI_LOGDIR`,",
        "else `runs/<name>`), `resources`, and the sections of its kind: train needs `train` (and takes `model`,",
        "`diffusion`); sample needs `sample`; evaluate needs `evaluate`.",
    ]
    for name, cls in SECTIONS:
        lines += ["", f"## `{name}`", "", (cls.__doc__ or "").strip().split("\n")[0], "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in cls.model_fields.items():
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | {field.description or ''} |")
    return "\n".join(lines) + "\n"
