"""Sweeps: a grid of points over spec keys, each point a run of its own in ``RUN_DIR/<point name>/``, submitted as
one Slurm job array per stage (``idiff-submit SPEC [MORE STAGES] --sweep KEY=V1,V2 ...``).

A chain of stages becomes a chain of arrays in which task i of a stage waits on task i of the previous one only
(Slurm's ``aftercorr``): a failed point cancels its own later stages and no other point's. Every point is
validated, and every run dir checked, before anything is written or submitted. The base run dir of each stage
(the spec's ``run_dir``) holds ``sweep.json`` (the points, and the arrays submitted) and the arrays' submitit
folders (``slurm/<array id>_<task>/``); the points' run dirs are ordinary run dirs below it.
"""

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .. import storage
from ..errors import UserError
from ..jobspec.load import SpecError, load_spec, parse_spec, safe_load_bounded
from ..run_dir import CHAIN_EVENT, SWEEP_FILE, RunDir, claim_run_dir, sweep_record, utc_now
from .chain import Stage, chain_record, check_chain, reads
from .submit import (
    SubmittedJob,
    check_submittable,
    destination,
    executor_for,
    executor_parameters,
    print_dry_run,
    slurm_for,
    submit_job,
    test_only,
)

# Slurm's default MaxArraySize is 1001 (task ids 0..1000). A larger grid: split it into several sweeps (several
# sweep files, each with its own run_dir), or, where the cluster's MaxArraySize allows, raise --max-points.
MAX_POINTS = 1000
MAX_NAME_BYTES = 200  # a point's folder name; a file system allows 255
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class Point:
    name: str  # its folder below each stage's run_dir, e.g. "lr=1e-4,dropout=0.1"
    values: dict  # dotted key -> the value's text, as --set takes it


def _value_text(value) -> str:
    """A sweep file's value as --set text: strings as written, anything else as one line of YAML."""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # JSON is YAML: 0.0001, true, [1, 2]


def read_sweep_file(path: str) -> tuple[dict, list[dict]]:
    """(grid: key -> value texts, points: [key -> value text]) of a sweep file: ``grid:`` (a mapping of keys to
    lists of values), ``points:`` (a list of mappings of keys to values), or both (every point with every grid
    combination)."""
    if not storage.exists(path) or storage.isdir(path):
        raise UserError(f"--sweep-file {path}: no such file")
    data = safe_load_bounded(storage.read_text(path), path)
    if not isinstance(data, dict) or not set(data) <= {"grid", "points"} or not data:
        raise UserError(f"--sweep-file {path}: expected a mapping with `grid:` (KEY: [values]) and/or `points:` "
                        f"(a list of KEY: value mappings)")
    grid, points = data.get("grid") or {}, data.get("points")
    if not isinstance(grid, dict) or not all(isinstance(v, list) for v in grid.values()):
        raise UserError(f"--sweep-file {path}: grid: expected KEY: [value, ...] lines")
    if points is not None and not (isinstance(points, list) and all(isinstance(p, dict) for p in points)):
        raise UserError(f"--sweep-file {path}: points: expected a list of KEY: value mappings")
    if points is not None and not points:
        raise UserError(f"--sweep-file {path}: points: the list is empty")
    return ({str(k): [_value_text(v) for v in values] for k, values in grid.items()},
            [{str(k): _value_text(v) for k, v in p.items()} for p in points or [{}]])


def parse_sweep_flag(item: str) -> tuple[str, list[str]]:
    """``train.lr=1e-4,2e-4`` -> ("train.lr", ["1e-4", "2e-4"])."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--sweep {item}: expected KEY=VALUE1,VALUE2,... e.g. train.lr=1e-4,2e-4")
    values = [v.strip() for v in raw.split(",")]
    if not raw.strip() or any(v == "" for v in values):
        raise UserError(f"--sweep {key}: an empty value (the sweep has no point there); list the values, "
                        f"comma-separated (a list value goes in a --sweep-file)")
    return key.strip(), values


def grid_points(sweeps: list[str], sweep_file: str | None, max_points: int = MAX_POINTS) -> list[dict]:
    """The value texts of every point: every --sweep and grid combination with every point of the sweep file."""
    grid: dict[str, list[str]] = {}
    for key, values in map(parse_sweep_flag, sweeps):
        if key in grid:
            raise UserError(f"--sweep {key}: given twice; list all its values in one --sweep")
        grid[key] = values
    listed = [{}]
    if sweep_file is not None:
        file_grid, listed = read_sweep_file(sweep_file)
        for key, values in file_grid.items():
            if key in grid:
                raise UserError(f"--sweep {key}: also in the grid of {sweep_file}")
            if not values:
                raise UserError(f"--sweep-file {sweep_file}: grid: {key}: no values (the sweep would be empty)")
            grid[key] = values
    if not grid and listed == [{}]:
        raise UserError("the sweep is empty: give --sweep KEY=V1,V2 or a --sweep-file with points")
    count = len(listed) * _product([len(v) for v in grid.values()])
    if count > max_points:
        raise UserError(f"the sweep has {count} points, more than --max-points {max_points} (Slurm's default "
                        f"MaxArraySize allows {MAX_POINTS}): split it into several sweeps with run dirs of their "
                        f"own, or raise --max-points where the cluster's MaxArraySize allows")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points = []
    for fixed in listed:
        for combo in combos:
            both = set(fixed) & set(combo)
            if both:
                raise UserError(f"--sweep {sorted(both)[0]}: both in the grid and in a listed point")
            points.append({**fixed, **combo})
    return points


def _product(numbers: list[int]) -> int:
    total = 1
    for n in numbers:
        total *= n
    return total


def point_names(points: list[dict]) -> list[Point]:
    """Each point with its folder name: ``key=value`` joined by commas, a key by its last part (``lr``) unless two
    keys share it; characters other than letters, digits and ``._+-`` become ``_``. Two points with one name are
    refused: they would share a run dir."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}
    named, seen = [], {}
    for values in points:
        name = ",".join(f"{_UNSAFE.sub('_', short[k])}={_UNSAFE.sub('_', v)}" for k, v in values.items())
        if len(name.encode()) > MAX_NAME_BYTES:
            raise UserError(f"sweep point {name[:60]}...: its folder name is longer than {MAX_NAME_BYTES} bytes; "
                            f"sweep fewer keys, or shorter values")
        if name in seen:
            raise UserError(f"sweep points {seen[name]} and {values} have the same run dir name {name}: give values "
                            f"that differ in letters, digits or ._+-")
        seen[name] = values
        named.append(Point(name, values))
    return named


def _has_key(data: dict, key: str) -> bool:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def key_targets(stages: list[Stage], keys: list[str]) -> dict[str, list[int]]:
    """The stage numbers each sweep key sets: those whose spec has the key; in a chain with a training stage, a
    key outside the ``sample`` and ``evaluate`` sections sets the training stages only (as --set does)."""
    has_training = any(s.spec.kind == "train" for s in stages) and len(stages) > 1
    targets = {}
    for key in keys:
        if key == "run_dir":
            raise UserError("--sweep run_dir: the sweep gives each point its run dir (RUN_DIR/<point name>)")
        found = [s for s in stages if _has_key(s.spec.model_dump(mode="json"), key)]
        if has_training and key.split(".")[0] not in ("sample", "evaluate"):
            found = [s for s in found if s.spec.kind == "train"]
        if not found:
            where = ", ".join(f"{s.path} ({s.spec.kind})" for s in stages)
            raise UserError(f"--sweep {key}: no such key in {where} (see `idiff spec --docs`; a section the spec "
                            f"leaves out must be given in the spec first)")
        targets[key] = [s.number for s in found]
    return targets


def point_stages(stages: list[Stage], overrides: list[str], point: Point, targets: dict) -> list[Stage]:
    """The chain of ``point``: each stage with the point's values, its run dir ``<run_dir>/<point name>``, and
    every path it reads from an earlier stage's run dir moved to that stage's point."""
    result = []
    bases = {s.number: s.spec.run_dir for s in stages}
    for stage in stages:
        mine = [f"{k}={v}" for k, v in point.values.items() if stage.number in targets[k]]
        own = overrides if len(stages) == 1 or stage.spec.kind == "train" else []
        run_dir = storage.join(stage.spec.run_dir, point.name)
        try:
            spec = load_spec(stage.path, [*own, *mine, f"run_dir={json.dumps(run_dir)}"])
            moved = _moved_reads(spec, bases, point.name, stage.number)
            if moved:
                spec = parse_spec(_with_paths(spec, moved), source=stage.path)
        except SpecError as err:
            raise UserError(f"sweep point {point.name}: {err}") from None
        result.append(Stage(stage.number, stage.path, spec))
    return result


def _moved_reads(spec, bases: dict, name: str, number: int) -> dict:
    """{field: path} for each path ``spec`` reads inside the base run dir of an earlier stage: into its point."""
    moved = {}
    for field, path, _ in reads(spec):
        for other, base in bases.items():
            if other < number and (path == base or path.startswith(base.rstrip("/") + "/")):
                moved[field] = storage.join(base, name) + path[len(base.rstrip("/")):]
    return moved


def _with_paths(spec, moved: dict) -> dict:
    data = spec.model_dump(mode="json")
    for field, path in moved.items():
        node = data
        *parents, leaf = field.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = path
    return data


@dataclass
class Sweep:
    stages: list[Stage]  # the specs as given: their run dirs hold the points
    points: list[Point]
    chains: list[list[Stage]]  # each point's stages, in the order of ``points``


def plan_sweep(paths: list[str], overrides: list[str], sweeps: list[str], sweep_file: str | None, *,
               local=False, force_new=False, max_points: int = MAX_POINTS) -> Sweep:
    """Every point's chain of stages, each checked as a submission checks it; writes nothing."""
    from .chain import load_chain

    points = point_names(grid_points(sweeps, sweep_file, max_points))
    stages = load_chain(paths, overrides)
    targets = key_targets(stages, list(dict.fromkeys(k for p in points for k in p.values)))
    chains = []
    for point in points:
        chain = point_stages(stages, overrides, point, targets)
        for stage in chain:
            try:
                check_submittable(stage.spec, local=local, force_new=force_new)
            except UserError as err:
                where = f"{stage.label}: " if len(chain) > 1 else ""
                raise UserError(f"sweep point {point.name}: {where}{err}") from None
        try:
            check_chain(chain)
        except UserError as err:
            raise UserError(f"sweep point {point.name}: {err}") from None
        chains.append(chain)
    for stage in stages:
        check_sweep_dir(stage.spec.run_dir, points)
    _check_one_allocation(stages, points, chains, local)
    return Sweep(stages, points, chains)


def check_sweep_dir(path: str, points: list[Point]) -> None:
    """A stage's run dir takes a sweep when it is absent, empty, or holds this sweep's points (submitted again:
    each point then resumes, as one run does)."""
    if not storage.exists(path):
        return
    if not storage.isdir(path):
        raise UserError(f"run_dir {path} is a file, not a folder; choose another run_dir")
    if RunDir(path).is_owned():
        raise UserError(f"run_dir {path} holds a run, not a sweep: give the sweep another run_dir")
    record = sweep_record(path) if storage.exists(storage.join(path, SWEEP_FILE)) else None
    if record is None:
        if storage.listdir(path):
            raise UserError(f"run_dir {path} is not empty and holds no sweep: give the sweep another run_dir")
        return
    if [p["name"] for p in record["points"]] != [p.name for p in points]:
        raise UserError(f"run_dir {path} holds another sweep ({len(record['points'])} points, see {SWEEP_FILE}): "
                        f"give this one another run_dir, or continue that one with `idiff-resume {path}`")


def _check_one_allocation(stages, points, chains, local) -> None:
    """A job array asks for one allocation size: a sweep key may not change a stage's resources."""

    cluster = "local" if local else "slurm"
    for stage in stages:
        first = executor_parameters(chains[0][stage.number - 1].spec, cluster)
        for point, chain in zip(points[1:], chains[1:]):
            if executor_parameters(chain[stage.number - 1].spec, cluster) != first:
                raise UserError(f"sweep point {point.name}: {stage.label}: its resources differ from point "
                                f"{points[0].name}'s, and a job array has one allocation size: sweep resources in "
                                f"separate sweeps")


def _start_record(base: str, number: int, sweep: Sweep) -> None:
    """The sweep.json of stage ``number``'s run dir, unless it has one (the sweep submitted again)."""
    if storage.exists(storage.join(base, SWEEP_FILE)):
        return
    storage.makedirs(base)
    stages = [{"stage": s.number, "kind": s.spec.kind, "spec": s.path, "run_dir": s.spec.run_dir} for s in sweep.stages]
    storage.atomic_write_text(storage.join(base, SWEEP_FILE), json.dumps({
        "stage": number, "stages": stages, "points": [{"name": p.name, "values": p.values} for p in sweep.points],
        "arrays": []}, indent=1))


def _add_array(base: str, tasks: list[str]) -> None:
    """Note a job array submitted for the points of ``base`` in its sweep.json."""
    record = sweep_record(base)
    record.setdefault("arrays", []).append({"job_id": tasks[0].split("_")[0], "tasks": tasks, "time": utc_now()})
    storage.atomic_write_text(storage.join(base, SWEEP_FILE), json.dumps(record, indent=1))


def array_folder(base: str) -> str:
    """submitit's folder of each task of a sweep's job arrays (``%j``: ``<array id>_<task>``)."""
    return os.path.abspath(storage.join(base, "slurm", "%j"))


def submit_array(specs: list, base: str, *, force_new=False, after: str | None = None, max_parallel: int | None,
                 out) -> list[str]:
    """Take every spec's run dir and submit the specs as one Slurm job array, its submitit folders in
    ``base/slurm/``; task i waits on task i of the array ``after`` (aftercorr). Returns the tasks' job ids."""

    for spec in specs:
        claim_run_dir(spec, force_new)
    executor = executor_for(specs[0], after=after, dependency="aftercorr", folder=array_folder(base))
    executor.update_parameters(slurm_array_parallelism=max_parallel or len(specs))
    try:
        jobs = executor.submit_array([SubmittedJob(spec.model_dump(mode="json")) for spec in specs])
    except Exception as err:  # sbatch's refusal arrives as submitit's FailedJobError with its stderr
        raise UserError(f"the scheduler refused the job array: {str(err).strip()}") from None
    for index, (spec, job) in enumerate(zip(specs, jobs)):
        RunDir(spec.run_dir).record("submit", kind=spec.kind, slurm_job_id=job.job_id, nodes=spec.resources.nodes,
                                    world_size=spec.resources.world_size,
                                    after=f"{after}_{index}" if after else None)
    array_id = jobs[0].job_id.split("_")[0]
    print(f"submitted job array {array_id} ({len(jobs)} tasks, at most {max_parallel or len(specs)} at once): "
          f"{specs[0].name}\n  logs:    {storage.join(base, 'slurm', array_id + '_<task>')}/", file=out)
    return [job.job_id for job in jobs]


def run_here(chains: list[list[Stage]], *, force_new=False, out) -> int:
    """--local: each point's stages through submitit's local executor, one after another; a point whose stage
    fails skips its later stages, and the others go on. Returns how many points failed."""

    failed = 0
    for chain in chains:
        for stage in chain:
            job = submit_job(stage.spec, True, force_new, after=None, out=out)
            job.wait()
            if job.exception() is not None:
                print(f"{stage.spec.run_dir}: {stage.spec.kind} failed (log: {job.paths.stderr}); the point's "
                      f"later stages are skipped", file=out)
                failed += 1
                break
    return failed


def submit_sweep(sweep: Sweep, *, local=False, dry_run=False, force_new=False, max_parallel: int | None = None,
                 out=None) -> list[list[str]]:
    """Submit every stage of ``sweep`` as a job array (--local: run the points here, one after another); returns
    each stage's task job ids (none for a dry run or --local)."""

    out = out or sys.stdout
    unreachable = slurm_for(local, dry_run)
    cluster = "local" if local else "slurm"
    n = len(sweep.points)
    print(f"sweep of {n} point(s) x {len(sweep.stages)} stage(s):", file=out)
    for stage in sweep.stages:
        print(("  would submit " if dry_run else "  submitting ") + destination(stage.spec, cluster)
              + f", {n} point(s) in {stage.spec.run_dir}/<point>", file=out)
    if dry_run:
        _print_points(sweep, out)
        made = [s.spec.run_dir for s in sweep.stages if not storage.is_remote(s.spec.run_dir)
                and not os.path.exists(s.spec.run_dir)]  # submitit makes its folder when the executor is made
        for stage in sweep.chains[0]:
            after = f"<the job array of stage {stage.number - 1}>" if stage.number > 1 else None
            print_dry_run(stage.spec, local, after, out, f"# {stage.label}, first point\n",
                           slurm_reachable=not unreachable, dependency="aftercorr",
                           folder=None if local else array_folder(sweep.stages[stage.number - 1].spec.run_dir))
            if not local:
                print(f"# one job array of {n} task(s): array: 0-{n - 1}%{min(n, max_parallel or n)}", file=out)
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        return []
    if local:
        for stage in sweep.stages:
            _start_record(stage.spec.run_dir, stage.number, sweep)
        failed = run_here(sweep.chains, force_new=force_new, out=out)
        if failed:
            raise UserError(f"{failed} of {n} sweep point(s) failed (above); the others completed")
        return []
    for stage in sweep.chains[0]:
        test_only(executor_for(stage.spec))  # before any run dir is touched
    arrays: list[list[str]] = []
    try:
        for stage in sweep.stages:
            specs = [chain[stage.number - 1].spec for chain in sweep.chains]
            _start_record(stage.spec.run_dir, stage.number, sweep)
            arrays.append(submit_array(specs, stage.spec.run_dir, force_new=force_new, max_parallel=max_parallel,
                                       after=arrays[-1][0].split("_")[0] if arrays else None, out=out))
            _add_array(stage.spec.run_dir, arrays[-1])
    except UserError as err:
        if arrays:  # all or nothing: the first stages would run for nothing
            submitted = [tasks[0].split("_")[0] for tasks in arrays]
            subprocess.run(["scancel", *submitted], capture_output=True, timeout=60)
            raise UserError(f"{sweep.stages[len(arrays)].label}: {err}; cancelled the job arrays submitted before "
                            f"it ({', '.join(submitted)})") from None
        raise
    if len(sweep.stages) > 1:
        for index, chain in enumerate(sweep.chains):
            record = chain_record(chain, [tasks[index] for tasks in arrays])
            for position, stage in enumerate(chain, start=1):
                RunDir(stage.spec.run_dir).record(CHAIN_EVENT, stage=position, stages=record)
    print(f"sweep: {' -> '.join(tasks[0].split('_')[0] for tasks in arrays)}; follow it with `idiff status "
          f"{sweep.stages[0].spec.run_dir}`", file=out)
    return arrays


def _print_points(sweep: Sweep, out) -> None:
    for point, chain in zip(sweep.points, sweep.chains):
        print(f"point {point.name}: " + ", ".join(f"{k}={v}" for k, v in point.values.items())
              + f" -> {', '.join(s.spec.run_dir for s in chain)}", file=out)


def unfinished_points(sweep_dir: str, record: dict) -> tuple[list[RunDir], list[str]]:
    """(the points of a sweep's stage to run again, a note on each point left alone): a point is left alone when
    its last job completed, or is still queued or running."""
    from ..status import is_final, slurm_state

    again, notes = [], []
    for point in record["points"]:
        run = RunDir(storage.join(sweep_dir, point["name"]))
        history = run.history() if storage.exists(run.history_file) else []
        ends = [e for e in history if e["event"] == "end"]
        submitted = [str(e["slurm_job_id"]) for e in history if e["event"] == "submit" and e.get("slurm_job_id")]
        if ends and ends[-1].get("status") == "completed":
            notes.append(f"{point['name']}: completed")
        elif submitted and not is_final(state := slurm_state(submitted[-1])[0]):
            notes.append(f"{point['name']}: job {submitted[-1]} is {state}")
        elif run.saved_spec() is None:
            notes.append(f"{point['name']}: never submitted (no spec.yaml): submit the sweep again")
        else:
            again.append(run)
    return again, notes


def resume_sweep(sweep_dir: str, resource_overrides: list[str], *, local=False, dry_run=False,
                 max_parallel: int | None = None, out=None) -> list[str]:
    """``idiff-resume SWEEP_DIR``: submit the unfinished points of a sweep's stage again, as one job array (--local:
    here, one after another); each continues from its newest complete checkpoint. Returns the tasks' job ids."""
    from ..jobspec.load import apply_overrides

    out = out or sys.stdout
    record = sweep_record(sweep_dir)
    again, notes = unfinished_points(sweep_dir, record)
    specs = []
    for run in again:
        try:
            specs.append(parse_spec(apply_overrides({**run.saved_spec(), "run_dir": run.path}, resource_overrides),
                                    source=run.spec_file, overrides=resource_overrides))
        except SpecError as err:
            raise UserError(str(err)) from None
    slurm_for(local, dry_run)
    for note in notes:
        print(f"left alone: {note}", file=out)
    if not specs:
        print(f"{sweep_dir}: no point to resume", file=out)
        return []
    names = ", ".join(os.path.basename(s.run_dir) for s in specs)
    print(("would resume " if dry_run else "resuming ") + names, file=out)
    if dry_run:
        return []
    if local:
        failed = run_here([[Stage(1, s.run_dir, s)] for s in specs], out=out)
        if failed:
            raise UserError(f"{failed} of {len(specs)} resumed point(s) failed (above)")
        return []
    test_only(executor_for(specs[0]))
    tasks = submit_array(specs, sweep_dir, max_parallel=max_parallel, out=out)
    _add_array(sweep_dir, tasks)
    return tasks
