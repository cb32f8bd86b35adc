"""Reading job specs from YAML, ``--set`` overrides, and error messages that name the field and line.

Specs are untrusted input: a file is read only up to MAX_SPEC_BYTES, and its YAML is refused before it
is built when it would expand (through aliases) beyond MAX_SPEC_NODES nodes or nest deeper than
MAX_SPEC_DEPTH; messages quote what was given only cut short.
"""

import difflib
import typing

import blobfile as bf
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from .. import storage
from ..errors import UserError, brief
from .schema import KINDS, Job, JobSpec

_ADAPTER = TypeAdapter(JobSpec)
MAX_SPEC_BYTES = 1 << 20  # the paper's specs are about 1 kB
MAX_SPEC_NODES = 100_000  # values after alias expansion
MAX_SPEC_DEPTH = 20
MAX_LISTED_ERRORS = 10


class SpecError(UserError):
    pass


def load_spec(path, overrides=()) -> Job:
    """Validate the YAML file at ``path`` with ``--set`` style ``overrides`` applied; an error in a value that
    an override set names the ``--set`` argument, not a line of the file."""
    data, text = read_spec_data(path)
    return parse_spec(apply_overrides(data, overrides), source=str(path), text=text, overrides=overrides)


def read_spec_data(path) -> tuple[dict, str]:
    """The raw mapping of a YAML spec file (not validated yet) and its text."""
    path = str(path)
    if not storage.exists(path):
        raise SpecError(f"{path}: no such spec file")
    if storage.isdir(path):
        raise SpecError(f"{path}: a folder, not a spec file")
    try:
        with bf.BlobFile(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec ({err.strerror or err})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES // 1024} KiB; a job spec is a small YAML file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not a text file (byte {err.start} is not UTF-8); a job spec is YAML") from None
    data = safe_load_bounded(text, path)
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job spec is a YAML mapping with at least 'kind' and 'name'")
    return data, text


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with a key twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {brief(str(key))} (first on line {first.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load_bounded(text: str, source: str):
    """``yaml.safe_load(text)`` (with duplicate keys refused), refused (SpecError naming ``source`` and the line)
    when not YAML, or when building it would take more than MAX_SPEC_NODES values or MAX_SPEC_DEPTH levels."""
    try:
        _check_size(text, source)
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader: plain data only)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{where}: not valid YAML: {problem}") from None


def _check_size(text: str, source: str) -> None:
    """Count the values that loading ``text`` makes, aliases expanded, from the parser's events alone
    (linear in the text, no recursion), so that an alias bomb is refused before anything is built."""
    expanded = {}  # anchor -> values it stands for
    open_collections = []  # [anchor, values so far] of the collections being read
    total = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, count = open_collections.pop()
            if anchor is not None:
                expanded[anchor] = count
            if open_collections:
                open_collections[-1][1] += count
            continue
        if isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in open_collections):
                raise SpecError(f"{source}:{event.start_mark.line + 1}: alias *{brief(event.anchor)} refers to a "
                                f"value that contains it; a job spec cannot be recursive")
            added = expanded.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            added = 1
            if event.anchor is not None:
                expanded[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(open_collections) >= MAX_SPEC_DEPTH:
                raise SpecError(f"{source}:{event.start_mark.line + 1}: nested more than {MAX_SPEC_DEPTH} levels "
                                f"deep; a job spec has sections of values")
            open_collections.append([event.anchor, 1])
            total += 1
            continue
        else:
            continue
        total += added
        if open_collections:
            open_collections[-1][1] += added
        if total > MAX_SPEC_NODES:
            raise SpecError(f"{source}:{event.start_mark.line + 1}: expands to more than {MAX_SPEC_NODES:,} values "
                            f"(through aliases); a job spec is far smaller")


def parse_spec(data: dict, source: str = "<spec>", text: str | None = None, overrides=()) -> Job:
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, data, source, text, overrides)) from None


def dump_spec(spec: Job) -> str:
    data = spec.model_dump(mode="json")
    first = ("kind", "name", "run_dir")
    ordered = {k: data[k] for k in first} | {k: v for k, v in data.items() if k not in (*first, "resources")}
    return yaml.safe_dump({**ordered, "resources": data["resources"]}, sort_keys=False)


def apply_overrides(data: dict, overrides) -> dict:
    """``["train.lr=2e-5", "resources.nodes=2"]`` -> nested keys set; values parse as YAML."""
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {brief(item)}: expected SECTION.KEY=VALUE, e.g. train.lr=2e-5")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {brief(item)}: {brief(part)} is not a section")
        node[leaf] = safe_load_bounded(raw, f"--set {brief(item)}") if raw.strip() else ""
    return data


# ----------------------------------------------------------------------------- error messages
def format_validation_error(err: ValidationError, data: dict, source: str, text: str | None,
                            overrides=()) -> str:
    set_by = {item.partition("=")[0]: item for item in overrides}  # dotted key -> its --set argument
    lines = [f"{source}: invalid job spec"]
    errors = err.errors()
    for error in errors[:MAX_LISTED_ERRORS]:
        loc = list(error["loc"])
        if loc and loc[0] in KINDS:  # the discriminated union prefixes the kind
            loc = loc[1:]
        dotted = ".".join(str(p) if len(str(p)) <= 40 else f"{str(p)[:40]}..." for p in loc) or "(top level)"
        override = next((item for key, item in set_by.items()
                         if ".".join(map(str, loc)) == key or ".".join(map(str, loc)).startswith(key + ".")), None)
        line = _line_of(text, loc) if text and override is None else None
        where = f"--set {brief(override)}: " if override else f"line {line}: " if line else ""
        lines.append(f"  {where}{dotted}: {_describe(error, data, loc)}")
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more")
    return "\n".join(lines)


def _describe(error, data, loc) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_key(_job_class(data), loc)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return f"kind must be one of {', '.join(KINDS)}"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return "required, but missing"
    if "input" in error and kind not in ("value_error", "assertion_error") and not isinstance(error["input"], dict):
        return f"{message} (got {brief(error['input'])})"
    return message


def _unknown_key(job, loc) -> str:
    """What the user probably meant by the key at ``loc``, from the spec models alone: a field that lists it
    among its ``aliases`` (the names other tools and papers use), the field of that name in another section,
    or a field spelled alike."""
    key, model = str(loc[-1]), _model_at(job, loc[:-1])
    names = list(model.model_fields) if model else []
    aliased = [name for name in names if key in (model.model_fields[name].json_schema_extra or {}).get("aliases", ())]
    if aliased:
        return f"unknown key; did you mean {aliased[0]!r}?"
    elsewhere = [".".join(path) for path, field in _fields(job) if path[-1] == key and list(path[:-1]) != loc[:-1]]
    if elsewhere:
        return f"unknown key here; {key} belongs in {' or '.join(elsewhere)}"
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key (known: {', '.join(names)})"


def _fields(cls, prefix=()):
    """(path, field) of every field of the model ``cls`` and of its sections, depth first."""
    for name, field in cls.model_fields.items():
        yield (*prefix, name), field
        section = _model_at(cls, [name])
        if section is not None:
            yield from _fields(section, (*prefix, name))


def _job_class(data):
    kind = data.get("kind") if isinstance(data, dict) else None
    return KINDS.get(kind, Job)


def _model_at(cls, loc):
    for part in loc:
        if cls is None or not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        cls = next((a for a in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return cls


def _line_of(text, loc):
    """1-based line of the deepest key of ``loc`` present in the YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
        if match is None:
            break
        line = match[0].start_mark.line + 1
        node = match[1]
    return line
