"""Chains of jobs: train, then sample, then evaluate, each stage reading what an earlier one wrote.

A chain is checked before anything is submitted: every path a stage reads (``from_run``, ``samples``,
``model_path``, data sets, ...) must be written by an earlier stage or exist already. Under Slurm each
stage waits for the previous one with ``afterok``; see ``submit.submit_chain``.
"""

import os
from dataclasses import dataclass

from .. import storage
from ..errors import UserError
from ..jobspec.load import load_spec
from ..run_dir import RunDir


@dataclass
class Stage:
    number: int  # 1-based, in submission order
    path: str  # the spec file
    spec: object  # the parsed JobSpec

    @property
    def label(self) -> str:
        return f"stage {self.number} ({self.path})"


def load_chain(paths: list[str], overrides: list[str]) -> list[Stage]:
    """The specs of a chain, ``overrides`` (--set, resource flags) applied to its training stages, or to the
    one spec of a chain of one: sampling and evaluation keep their own resources."""
    kinds = [load_spec(path).kind for path in paths] if len(paths) > 1 else [None]
    return [Stage(number, path, load_spec(path, overrides if len(paths) == 1 or kind == "train" else []))
            for number, (path, kind) in enumerate(zip(paths, kinds), start=1)]


def _key(path: str) -> str:
    """Two spellings of one local path compare equal."""
    return path if storage.is_remote(path) else os.path.normpath(os.path.abspath(path))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def reads(spec) -> list[tuple[str, str, str]]:
    """(field, path, what it must be) of each path ``spec`` reads: "training run", "samples" (a sample run dir
    or its .npz) or "input" (anything that exists)."""
    if spec.kind == "train":
        t = spec.train
        found = [("train.data_dir", t.data_dir, "input"), ("train.resume_checkpoint", t.resume_checkpoint, "input")]
        if t.evaluate is not None:
            e = t.evaluate
            found += [(f"train.evaluate.{name}", getattr(e, name), "input")
                      for name in ("data_dir", "reference", "inception_weights")]
        return [(field, path, what) for field, path, what in found if path]
    section = spec.sample if spec.kind == "sample" else spec.evaluate
    found = [(f"{spec.kind}.from_run", section.from_run, "training run"),
             (f"{spec.kind}.model_path", section.model_path, "input")]
    if spec.kind == "sample":
        found.append(("sample.base_samples", section.base_samples, "samples"))
    else:
        found += [("evaluate.data_dir", section.data_dir, "input"), ("evaluate.samples", section.samples, "samples"),
                  ("evaluate.reference", section.reference, "input"),
                  ("evaluate.inception_weights", section.inception_weights, "input")]
    return [(field, path, what) for field, path, what in found if path]


def samples_file(stage: Stage, stages: list[Stage]) -> str | None:
    """The .npz a sample stage collects into its run dir (see collect.collect), when its image size is known:
    from its own model section, or from the training stage or run dir it samples."""
    spec = stage.spec
    if spec.model is not None:
        size = spec.model.output_size
    else:
        source = _key(spec.sample.from_run)
        trainer = next((s.spec for s in stages if s.spec.kind == "train" and _key(s.spec.run_dir) == source), None)
        saved = trainer.model_dump() if trainer is not None else RunDir(spec.sample.from_run).saved_spec()
        model = (saved or {}).get("model") or {}
        size = model.get("large_size") or model.get("image_size")
        if not isinstance(size, int):
            return None
    return RunDir(spec.run_dir).collected(spec.sample.total_samples, size, size)


def check_chain(stages: list[Stage]) -> None:
    """UserError naming the stage and field of the first path that no earlier stage writes and that does not
    exist, or that an earlier stage writes but is not what the field needs."""
    for stage in stages:
        for other in stages[:stage.number - 1]:
            if _key(other.spec.run_dir) == _key(stage.spec.run_dir):
                raise UserError(f"{stage.label}: run_dir {stage.spec.run_dir} is also the run dir of {other.label}; "
                                f"give each stage its own")
    chained = len(stages) > 1
    for stage in stages:
        for field, path, what in reads(stage.spec):
            writer = next((s for s in stages if _inside(_key(path), _key(s.spec.run_dir))), None)
            if writer is None:
                if not storage.exists(path):
                    raise UserError(f"{stage.label}: {field}: {path} does not exist and no earlier stage writes it"
                                    if chained else f"{field}: {path} does not exist")
                continue
            if writer is stage:
                raise UserError(f"{stage.label if chained else stage.path}: {field}: {path} lies inside the job's own "
                                f"run_dir {stage.spec.run_dir}: a job cannot read what it writes; give it another "
                                f"run_dir")
            if writer.number >= stage.number:
                raise UserError(f"{stage.label}: {field}: {path} is written by {writer.label}, which does not run "
                                f"before it: order the specs so that {writer.path} comes first")
            _check_output(stage, field, path, what, writer, stages)
        if stage.spec.kind != "train" and not any(s.spec.kind == "train" and s.number < stage.number
                                                  for s in stages):
            _check_weights(stage, chained)


def _check_weights(stage: Stage, chained: bool) -> None:
    """The weights a sample or evaluate stage loads exist now (no earlier stage trains them): the checkpoint
    step and EMA rate it asks for, without reading a tensor."""
    from ..weights import resolve

    try:
        resolve(stage.spec, stage.spec.source)
    except UserError as err:
        raise UserError(f"{stage.label}: {err}" if chained else str(err)) from None


def _check_output(stage, field, path, what, writer, stages) -> None:
    """``path`` lies in ``writer``'s run dir: is it what ``field`` needs?"""
    kind = writer.spec.kind
    if what == "training run" and (kind != "train" or _key(path) != _key(writer.spec.run_dir)):
        raise UserError(f"{stage.label}: {field}: {path} is not a training run dir ({writer.label} is a {kind} job "
                        f"writing {writer.spec.run_dir})")
    if what == "samples":
        if kind != "sample":
            raise UserError(f"{stage.label}: {field}: {writer.label} is a {kind} job; it writes no samples")
        npz = samples_file(writer, stages)
        if _key(path) != _key(writer.spec.run_dir) and npz is not None and _key(path) != _key(npz):
            raise UserError(f"{stage.label}: {field}: {writer.label} writes {npz}, not {path}; name that file or "
                            f"its run dir {writer.spec.run_dir}")


def chain_record(stages: list[Stage], job_ids: list[str | None]) -> list[dict]:
    """What each run dir's ``chain`` event lists: the stages in order, with their job ids."""
    return [{"stage": s.number, "spec": s.path, "kind": s.spec.kind, "name": s.spec.name, "run_dir": s.spec.run_dir,
             "slurm_job_id": job_id} for s, job_id in zip(stages, job_ids)]
