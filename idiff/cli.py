"""``idiff``: validate, run and inspect jobs. Thin: parse, validate, dispatch."""

import argparse
import sys

from .errors import UserError, guarded

RUN_KINDS = ("train", "sample", "evaluate")


def _add_run_command(subparsers, kind):
    from .jobspec.flags import add_flag_arguments

    p = subparsers.add_parser(kind, help=f"run {'an' if kind[0] in 'aeiou' else 'a'} {kind} job", description=(
        f"Run a {kind} job from a YAML spec and/or the original scripts' flags (flags override the spec)."))
    p.add_argument("spec", nargs="?", help="job spec YAML (optional when flags describe the job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a spec value, e.g. --set train.lr=2e-5 (repeatable)")
    p.add_argument("--nproc", type=int, default=1, help="ranks to start on this machine (default: 1)")
    p.add_argument("--force-new", action="store_true",
                   help="the run dir holds another spec: move it aside and start afresh")
    p.add_argument("--name", help="run name (default: from the spec, or a digest of the flags)")
    add_flag_arguments(p, kind)
    if kind == "evaluate":
        group = p.add_argument_group("reference statistics (instead of a job: idiff evaluate --make-reference SRC "
                                     "--out REF.npz)")
        group.add_argument("--make-reference", metavar="SRC", help=(
            "write the statistics of the real images SRC (a folder or an .npz) in guided-diffusion's reference-batch "
            "layout, with 10,000 of the images as arr_0 for precision/recall"))
        group.add_argument("--out", metavar="REF.npz", help="the statistics file to write")
        group.add_argument("--inception-weights", metavar="FILE", help="Inception weights (default: torch's cache)")
        group.add_argument("--resolution", type=int, metavar="N", help="the size to resize a folder's images to")
        group.add_argument("--device", default=None, help="where Inception runs (default: cuda if available)")
    p.set_defaults(handler=_run)


def build_spec(kind: str, args) -> "object":
    """Spec file (if any) + original flags + --set overrides, validated."""
    from .jobspec.flags import flag_values, merge, spec_from_flags
    from .jobspec.load import SpecError, apply_overrides, parse_spec, read_spec_data

    fragment = flag_values(args, kind)
    if getattr(args, "name", None):
        fragment["name"] = args.name
    if args.spec:
        data, text = read_spec_data(args.spec)
        if data.get("kind", kind) != kind and data.get("kind") in RUN_KINDS:
            raise SpecError(f"{args.spec} is a {data.get('kind')} spec; run it with `idiff {data.get('kind')}`")
        source = args.spec
        data = merge({"kind": kind, **data}, fragment)
    else:
        data, text, source = spec_from_flags(kind, fragment), None, "flags"
    return parse_spec(apply_overrides(data, args.overrides), source=source, text=text)


def _without_nproc(argv):
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            out.append(token)
    return out


def _make_reference(args) -> int:
    import torch

    from .fidelity.make_reference import make_reference

    if args.spec or not args.out:
        raise UserError("idiff evaluate --make-reference SRC --out REF.npz takes no spec; --out is required")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    make_reference(args.make_reference, args.out, args.inception_weights, args.resolution, device)
    return 0


def _compare(args, argv) -> int:
    from .fidelity.compare import print_comparison

    return print_comparison(args.runs)


def _run(args, argv) -> int:
    if getattr(args, "make_reference", None):
        return _make_reference(args)
    from .launch.hooks import hooks_for
    from .launch.runner import exit_code, run_job
    from .ranks.env import detect_rank_env
    from .ranks.signals import PreemptionFlag
    from .run_dir import check_run_dir

    spec = build_spec(args.command, args)
    env = detect_rank_env()
    if args.nproc > 1 and env.world_size == 1:
        from .launch.local import run_local_ranks

        check_run_dir(spec, args.force_new)  # fail before starting anything
        return run_local_ranks(_without_nproc(argv), args.nproc)
    with PreemptionFlag(announce=env.is_main) as flag:
        status = run_job(hooks_for(spec, env, force_new=args.force_new, preemption=flag))
    return exit_code(status, flag.received)


def _validate(args, argv) -> int:
    from .jobspec.load import load_spec

    if args.chain:
        return _validate_chain(args)
    failed = 0
    for path in args.specs:
        try:
            spec = load_spec(path, args.overrides)
        except UserError as err:
            print(err, file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok: {spec_summary(spec)}")
    return 2 if failed else 0


def _validate_chain(args) -> int:
    """What idiff-submit checks before it submits the specs as a chain; raises UserError (exit 2)."""
    from .launch.chain import check_chain, load_chain

    stages = load_chain(args.specs, args.overrides)
    check_chain(stages)
    for stage in stages:
        print(f"{stage.label}: ok: {spec_summary(stage.spec)}")
    print("chain ok: every path a stage reads is written by an earlier stage or exists")
    return 0


def spec_summary(spec) -> str:
    r = spec.resources
    where = f"{r.nodes} node(s) x {r.ranks_per_node} rank(s)"
    if spec.kind == "train":
        m, t = spec.model, spec.train
        end = f"{t.max_steps} steps" if t.max_steps else f"{t.max_images} images"
        size = f"{m.small_size}->{m.large_size}px" if m.is_super_res else f"{m.image_size}px"
        return (f"train {spec.name}: {size}, {m.num_channels}ch x {m.num_res_blocks} blocks, "
                f"T={spec.diffusion.diffusion_steps} {spec.diffusion.noise_schedule}, batch {t.batch_size}, "
                f"lr {t.lr:g}, {end}, {t.precision}; {where} -> {spec.run_dir}")
    if spec.kind == "sample":
        s = spec.sample
        how = s.sampling
        sets = f" x {s.seed_sets} seed sets" if s.seed_sets > 1 else ""
        return (f"sample {spec.name}: {s.num_samples} images{sets}, {how}, batch {s.batch_size}; {where} -> "
                f"{spec.run_dir}")
    return f"evaluate {spec.name}: {', '.join(spec.evaluate.metrics)}; {where} -> {spec.run_dir}"


def _spec(args, argv) -> int:
    if args.docs:
        from .jobspec.docs import spec_reference

        print(spec_reference(), end="")
        return 0
    if args.schema:
        import json

        from pydantic import TypeAdapter

        from .jobspec.schema import JobSpec

        print(json.dumps(TypeAdapter(JobSpec).json_schema(), indent=1))
        return 0
    from .jobspec.load import dump_spec

    # everything argparse did not know: the job's flags
    print(dump_spec(spec_from_job_arguments(args.kind, args.flags, "idiff spec --from-flags")), end="")
    return 0


def spec_from_job_arguments(kind: str, words: list[str], prog: str):
    """The spec that ``idiff KIND WORDS...`` would run."""
    sub = argparse.ArgumentParser(prog=f"{prog} {kind}")
    _add_run_command(sub.add_subparsers(dest="command"), kind)
    return build_spec(kind, sub.parse_args([kind, *words]))


def _status(args, argv) -> int:
    from .status import print_runs, print_status

    if args.run_dir is None:
        return print_runs()
    return print_status(args.run_dir, verify=args.verify, watch=args.watch, sort=args.sort)


def _srun_prefix(args, argv) -> int:
    """What slurm/*.sbatch put between `srun` and the job: nothing without resources.container."""
    import os

    from .launch.container import check_container, srun_options, wrap

    spec = spec_from_job_arguments(args.kind, args.job_args, "idiff srun-prefix")
    if spec.resources.container is not None:
        cwd = os.getcwd()
        check_container(spec, cwd)
        print("\n".join([*srun_options(spec, cwd), *wrap(spec, ["idiff"], cwd)]))  # no newline in any word
    return 0


def _tune_schedule(args, argv) -> int:
    from .jobspec.load import load_spec
    from .tuned_schedule import tune_schedule

    spec = load_spec(args.spec, args.overrides)
    if spec.kind != "sample":
        raise UserError(f"{args.spec} is a {spec.kind} spec; tune-schedule takes a sample spec")
    if args.warmup < 1:
        raise UserError(f"--warmup: at least one warm-up image, got {args.warmup}")
    record = tune_schedule(spec, args.out, seed=args.seed, warmup=args.warmup)
    others = ", ".join(f"{name} {e:.3g}" for name, e in record["candidates_rmse"].items())
    print(f"{args.out}: {record['sampler']} {record['steps']} steps, RMSE {record['rmse']:.3g} (0-255) to the "
          f"reference on {record['warmup_images']} warm-up images (candidates: {others}); {record['nfe']} model "
          f"evaluations, {record['seconds']:.0f} s")
    return 0


def _collect(args, argv) -> int:
    from .collect import main as collect_main

    return collect_main(argv[argv.index("collect") + 1:])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idiff", description=(
        "Improved DDPM as batch jobs: train, sample and evaluate from YAML specs, on a laptop, "
        "under mpiexec, in Docker or on Slurm (idiff-submit)."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for kind in RUN_KINDS:
        _add_run_command(sub, kind)
    p = sub.add_parser("validate", help="check specs; one summary line each")
    p.add_argument("specs", nargs="+", help="spec files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a spec value (with --chain: in the training stages)")
    p.add_argument("--chain", action="store_true", help=(
        "the specs are one chain, in order (as idiff-submit A B C submits them): also check that every path a "
        "stage reads is written by an earlier stage or exists"))
    p.set_defaults(handler=_validate)
    p = sub.add_parser("spec", help="print the spec a flag invocation means, or the spec reference")
    p.add_argument("--from-flags", dest="kind", choices=RUN_KINDS, metavar="{" + ",".join(RUN_KINDS) + "}",
                   help="the job kind whose original flags follow, e.g. `idiff spec --from-flags train --image_size 64 "
                        "--num_channels 128 ...`")
    p.add_argument("--docs", action="store_true", help="print the spec reference (markdown)")
    p.add_argument("--schema", action="store_true", help="print the JSON schema")
    p.set_defaults(handler=_spec)
    p = sub.add_parser("status", help="where a run or its chain stands: Slurm state, progress, ETA, checkpoints",
                       description="Where a run stands (or, for a stage of a chain, the whole chain): each Slurm "
                                   "job's state and restarts, the step or images done, throughput and ETA, the last "
                                   "checkpoint and the evaluations.")
    p.add_argument("run_dir", nargs="?", help="a run dir; without it, the runs below this folder, a line each")
    p.add_argument("--watch", nargs="?", type=float, const=10.0, metavar="SECONDS",
                   help="print it again every SECONDS (default 10) until no job is queued or running")
    p.add_argument("--verify", action="store_true",
                   help="check every checkpoint's files against its manifest's hashes (reads them all: slow)")
    p.add_argument("--sort", metavar="METRIC", help="a sweep's points ordered by METRIC, smallest first: loss, step, "
                                                    "node_hours, gpu_hours or an evaluation's metric (fid, nll_bpd)")
    p.set_defaults(handler=_status)
    p = sub.add_parser("compare", help="fidelity scores of runs side by side, with their protocols",
                       description="Print the scores of evaluate runs (or metrics.json files, or training runs' "
                                   "evals.jsonl rows) side by side with the protocol of each, marking scores whose "
                                   "protocols differ in a field that decides comparability.")
    p.add_argument("runs", nargs="+", metavar="RUN_OR_METRICS")
    p.set_defaults(handler=_compare)
    p = sub.add_parser("srun-prefix", help="for slurm/*.sbatch: the container command of a job, one word a line",
                       description="Print the words that run KIND SPEC [OPTIONS] in the spec's resources.container "
                                   "under srun (nothing without a container).")
    p.add_argument("kind", choices=RUN_KINDS)
    p.set_defaults(handler=_srun_prefix)
    p = sub.add_parser("tune-schedule", help="tune an ODE solver's chain times for a model (sample.schedule)",
                       description="Search the chain times that bring the sample spec's sampler, at its steps, "
                                   "closest to a fine solution of the same ODE on warm-up images; write them to OUT "
                                   "for the spec's sample.schedule.")
    p.add_argument("spec", help="sample spec YAML with sample.sampler (an ODE solver) and sample.steps")
    p.add_argument("--out", required=True, help="the schedule file to write (JSON)")
    p.add_argument("--warmup", type=int, default=64, help="warm-up images (default: 64)")
    p.add_argument("--seed", type=int, help="the warm-up images' seed (default: sample.seed + 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a spec value (repeatable)")
    p.set_defaults(handler=_tune_schedule)
    p = sub.add_parser("collect", help="merge sample shards (same as idiff-collect)", add_help=False)
    p.set_defaults(handler=_collect)
    from .data.cli import register as register_data

    register_data(sub)
    return parser


@guarded("idiff")
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "spec":
        if not (args.docs or args.schema or args.kind):
            parser.error("spec: pass --from-flags KIND FLAGS..., --docs or --schema")
        args.flags = extra
    elif args.command == "srun-prefix":
        args.job_args = extra
    elif extra and args.command not in ("collect", "data"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.handler(args, argv) if args.command != "data" else args.func(args)


if __name__ == "__main__":
    sys.exit(main())
