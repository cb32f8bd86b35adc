"""The command lines ``idiff-submit`` and ``idiff-resume``: their flags come from the spec's Resources fields."""

import argparse
import typing

from ..errors import UserError, guarded, report
from ..jobspec.load import apply_overrides, parse_spec
from ..jobspec.resources import Resources
from ..run_dir import RunDir, is_sweep_dir
from .chain import load_chain
from .submit import submit, submit_chain
from .sweep import MAX_POINTS, plan_sweep, resume_sweep, submit_sweep


def _scalar_type(annotation):
    """int or str for a field that one word sets (optional or not; a constrained str is a str; a float, such as
    a duration that also reads "90s", is passed on as the text given), else None."""
    if typing.get_origin(annotation) in (dict, list):
        return None
    if typing.get_origin(annotation) is typing.Annotated:
        return _scalar_type(typing.get_args(annotation)[0])
    candidates = [a for a in (annotation, *typing.get_args(annotation)) if a is not type(None)]
    for candidate in candidates:
        base = typing.get_args(candidate)[0] if typing.get_origin(candidate) is typing.Annotated else candidate
        if base in (int, str):
            return base
        if base is float:
            return str
    return None


# Resource fields that one command-line word can set; the sections (container, evaluate) and mappings cannot.
RESOURCE_FLAGS = {name: field for name, field in Resources.model_fields.items()
                  if _scalar_type(field.annotation) is not None}


def _resource_overrides(args) -> list[str]:
    return [f"resources.{name}={getattr(args, name)}" for name in RESOURCE_FLAGS if getattr(args, name) is not None]


def _common_arguments(parser):
    group = parser.add_argument_group("resources (override the spec's resources section)")
    for name, field in RESOURCE_FLAGS.items():
        kind = _scalar_type(field.annotation)
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar="N" if kind is int else "VALUE",
                           help=f"{field.description} (resources.{name})")
    parser.add_argument("--local", action="store_true", help="run through submitit's local executor, not Slurm")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved spec and sbatch parameters")


def _sweep_arguments(parser):
    group = parser.add_argument_group("sweeps (a job array per stage; each point a run in RUN_DIR/<point name>/)")
    group.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a grid axis: every point takes each value (several --sweep: every combination)")
    group.add_argument("--sweep-file", metavar="SWEEP.yaml",
                       help="`grid:` (KEY: [values]) and/or `points:` (a list of KEY: value mappings)")
    group.add_argument("--max-parallel", type=_positive, metavar="N",
                       help="at most N points of a stage run at once (the job array's %%N)")
    group.add_argument("--max-points", type=_positive, default=MAX_POINTS, metavar="N",
                       help=f"refuse a sweep of more points (default {MAX_POINTS}: Slurm's default MaxArraySize)")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return int(text)


@guarded("idiff-submit")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="idiff-submit", description=(
        "Submit job specs to Slurm via submitit. Several specs form a chain: each job starts once the previous "
        "one succeeded (afterok), and when one fails or is cancelled Slurm cancels the rest. The chain is "
        "checked first (`idiff validate --chain` does the same): every path a stage reads is written by an "
        "earlier stage or exists. In a chain, the resource flags and --set change the training stages only; "
        "sampling and evaluation keep their specs' resources."))
    parser.add_argument("specs", nargs="+", metavar="spec", help="job spec YAML; several: a chain, in order")
    _common_arguments(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--force-new", action="store_true", help="move a run dir of another spec aside")
    _sweep_arguments(parser)
    args = parser.parse_args(argv)
    try:
        overrides = [*args.overrides, *_resource_overrides(args)]
        if args.sweep or args.sweep_file:
            sweep = plan_sweep(args.specs, overrides, args.sweep, args.sweep_file, local=args.local,
                               force_new=args.force_new, max_points=args.max_points)
            submit_sweep(sweep, local=args.local, dry_run=args.dry_run, force_new=args.force_new,
                         max_parallel=args.max_parallel)
        else:
            submit_chain(load_chain(args.specs, overrides), local=args.local, dry_run=args.dry_run,
                         force_new=args.force_new)
    except UserError as err:
        return report(err, "idiff-submit")
    return 0


@guarded("idiff-resume")
def resume_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="idiff-resume", description=(
        "Resubmit a run's saved spec after a hard failure or a cancelled job; it continues from the newest "
        "complete checkpoint. The node count may change: the global batch stays, the per-rank split is recomputed."))
    parser.add_argument("run_dir", help="the run dir (holds spec.yaml), or a sweep's (holds sweep.json): every "
                                        "unfinished point")
    _common_arguments(parser)
    parser.add_argument("--max-parallel", type=_positive, metavar="N", help="a sweep's points at once (%%N)")
    args = parser.parse_args(argv)
    try:
        if is_sweep_dir(args.run_dir):
            resume_sweep(args.run_dir, _resource_overrides(args), local=args.local, dry_run=args.dry_run,
                         max_parallel=args.max_parallel)
            return 0
        saved = RunDir(args.run_dir).saved_spec()
        if saved is None:
            raise UserError(f"{args.run_dir}: not a run dir (no spec.yaml)")
        spec = parse_spec(apply_overrides({**saved, "run_dir": args.run_dir}, _resource_overrides(args)),
                          source=f"{args.run_dir}/spec.yaml")
        submit(spec, local=args.local, dry_run=args.dry_run)
    except UserError as err:
        return report(err, "idiff-resume")
    return 0
