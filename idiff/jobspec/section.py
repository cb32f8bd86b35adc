"""The base of every spec section, and the value types that several sections share."""

import os
import re
import typing
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..errors import brief
from ..storage import unsupported_scheme


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data):
        """YAML's ``true`` is not the number 1 (pydantic's lax mode would take it as one): a boolean is accepted
        only by a field that takes booleans."""
        for name, value in (data.items() if isinstance(data, dict) else ()):
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if isinstance(value, bool) and field is not None and field.annotation is not bool \
                    and bool not in typing.get_args(field.annotation):
                kind = "a number" if _takes_numbers(field.annotation) else "a value of its type"
                raise ValueError(f"{name}: expected {kind}, got the boolean {str(value).lower()}")
        return data


def _takes_numbers(annotation) -> bool:
    return annotation in (int, float) or any(_takes_numbers(a) for a in typing.get_args(annotation))


def check_path(value: str) -> str:
    """A path as written in a spec: used literally, so ``~`` and ``$VARS`` (which idiff does not expand: a spec
    means the same on every node and in every shell) and NUL bytes (which no file name holds) are refused."""
    if "\x00" in value:
        raise ValueError("contains a NUL byte, which no path can hold")
    unsupported = unsupported_scheme(value)
    if unsupported:
        raise ValueError(unsupported)
    if value.startswith("~"):
        raise ValueError(f"{brief(value)} starts with ~, which idiff does not expand: write the path out, e.g. "
                         f"{brief(os.path.expanduser(value))}")
    variable = re.search(r"\$(\{[^}]*\}|[A-Za-z_][A-Za-z0-9_]*)", value)
    if variable:
        raise ValueError(f"{brief(value)} holds {variable.group(0)}, which idiff does not expand: write the path "
                         f"out (a shell expands it in --set train.data_dir=$SCRATCH/...)")
    return value


PathText = Annotated[str, AfterValidator(check_path)]
Seed = Annotated[int, Field(ge=0, le=2**64 - 1)]  # what torch.Generator.manual_seed takes
