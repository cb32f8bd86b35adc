"""``idiff status RUN_DIR``: where a run (or the chain it belongs to) stands, from its files and the scheduler.

Fast on long runs: checkpoints are listed by their manifests' names, and only the tail of ``log.jsonl`` is
read; ``--verify`` hashes every checkpoint against its manifest (slow: it reads every file).
"""

import json
import os
import shutil
import subprocess
import sys
import time

from . import storage
from .checkpoints import CheckpointStore
from .errors import UserError
from .jobspec.load import SpecError
from .progress import format_duration
from .ranks.faults import fault_lines
from .run_dir import CHAIN_EVENT, RunDir, is_sweep_dir, sweep_record
from .shards import scan_shards
from .train.training_log import last_log_row

# sacct/squeue states in which a job will not run again
FINAL_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "TIMEOUT", "finished"}


def _run(cmd: list[str]) -> str | None:
    """stdout of a scheduler command, or None when it is absent, fails or does not answer."""
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def slurm_job_states(job_id: str) -> list[dict]:
    """Every run of a Slurm job (requeues included), from sacct; empty without accounting."""
    out = _run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State,Start,End,ExitCode", "-j", job_id]) or ""
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return [dict(zip(("job_id", "state", "start", "end", "exit_code"), row)) for row in rows if len(row) == 5]


def slurm_state(job_id: str) -> tuple[str, list[dict]]:
    """(state, sacct's runs of the job): squeue's state while the job is queued or running (with the reason it
    waits), else sacct's last; "finished" when neither knows it (no accounting, and squeue forgot it)."""
    queued = (_run(["squeue", "-h", "-j", job_id, "-o", "%T|%r"]) or "").strip().splitlines()
    runs = slurm_job_states(job_id)
    if queued and "|" in queued[0]:
        state, reason = queued[0].split("|", 1)
        return (f"{state} ({reason})" if state == "PENDING" and reason not in ("None", "") else state), runs
    return (runs[-1]["state"] if runs else "finished"), runs


def job_line(job_id: str, history: list[dict]) -> tuple[str, str]:
    """(a line on the Slurm job, its state)."""
    state, runs = slurm_state(job_id)
    restarts = max((e.get("restart_count") or 0 for e in history
                    if e["event"] == "start" and str(e.get("slurm_job_id")) == job_id), default=0)
    line = f"slurm job {job_id}: {state}, {restarts} restart(s)"
    if is_final(state) and runs:
        line = f"slurm job {job_id}: {', '.join(r['state'] for r in runs)} ({max(len(runs) - 1, 0)} requeue(s))"
    return line, state


def is_final(state: str) -> bool:
    return state.split(" ")[0] in FINAL_STATES


def _age(path) -> str:
    if storage.is_remote(path) or not os.path.exists(path):
        return ""
    return f", {format_duration(time.time() - os.path.getmtime(path))} ago"


def run_progress(run_dir: RunDir, spec, verify: bool) -> list[str]:
    """Where the run itself stands: steps, images or parts done, throughput and ETA, checkpoints."""
    lines = []
    if spec.kind == "train":
        row = last_log_row(run_dir)
        total = spec.train.total_steps
        if row is not None:
            step, rate = row["step"], row.get("images_per_s")
            text = f"step {step}/{total} ({100 * step / total:.1f}%)"
            if isinstance(row.get("loss"), (int, float)):
                text += f", loss {row['loss']:.5f}"
            if isinstance(rate, (int, float)) and rate > 0:
                # The rate of the last log interval, as log.jsonl has it; the progress line's is the mean since
                # the job started (start-up included), so the two may differ.
                eta = (total - step) * spec.train.batch_size / rate
                text += f", {rate:.3g} img/s over the last {spec.train.log_interval} steps, eta {format_duration(eta)}"
            lines.append(f"last log: {text} (log.jsonl{_age(run_dir / 'log.jsonl')})")
        lines += _checkpoints(run_dir, verify)
        lines += _evaluations(run_dir)
    elif spec.kind == "sample":
        done = sum(s.end - s.start for s in scan_shards(run_dir.samples))
        names = storage.listdir(run_dir.path) if storage.isdir(run_dir.path) else []
        collected = sorted(n for n in names if n.startswith("samples_") and n.endswith(".npz"))
        lines.append(f"progress: {done}/{spec.sample.total_samples} images in shards"
                     + (f"; collected {run_dir / collected[-1]}" if collected else ""))
    else:
        if "nll" in spec.evaluate.metrics:
            done = sum(s.end - s.start for s in scan_shards(run_dir.nll_parts))
            lines.append(f"progress: nll {done}/{spec.evaluate.num_samples} images")
        if storage.exists(run_dir.metrics_file):
            lines.append(f"results: {run_dir / 'metrics.json'}")
            lines += _protocol_lines(json.loads(storage.read_text(run_dir.metrics_file)).get("protocol"), [])
    return lines


def _checkpoints(run_dir: RunDir, verify: bool) -> list[str]:
    """The newest usable checkpoint, and the newer ones that are not. Without ``verify`` files are compared with
    their manifests by size, not hash: no checkpoint file is read, and usually only the newest is looked at."""
    store = CheckpointStore(run_dir.checkpoints)
    steps = store.steps()
    if not steps:
        return ["checkpoints: none yet"]
    broken, latest = [], None
    for step in reversed(steps):
        if store.problem(step, hashes=verify):
            broken.append(step)
        elif latest is None:
            latest = step
            if not verify:
                break
    how = "files hashed" if verify else "file sizes checked; --verify hashes them"
    lines = [f"last complete checkpoint: step {latest}, {_manifest(store, latest).get('images_seen', '?')} images "
             f"seen, {len(steps)} kept ({how})" if latest is not None else "checkpoints: none complete"]
    if broken:
        lines.append(f"incomplete or corrupt checkpoints: {', '.join(map(str, sorted(broken)))}")
    return lines


def _manifest(store, step) -> dict:
    try:
        manifest = store.manifest(step)
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _evaluations(run_dir: RunDir) -> list[str]:
    from .train.checkpoint_evaluations import evaluated_steps

    rows = evaluated_steps(run_dir.path)
    if not rows:
        return []
    last = rows[max(rows)]
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in last["metrics"].items())
    lines = [f"evaluations: {len(rows)} (last: step {last['step']}: {numbers}; {run_dir.evals_plot})"]
    return lines + _protocol_lines(last.get("protocol"), [row.get("protocol") for row in rows.values()])


def _protocol_lines(protocol: dict | None, others: list) -> list[str]:
    """The protocol of fidelity scores, and which deciding fields differ among ``others`` (marked, not hidden)."""
    from .fidelity.protocol import differences, summary

    if protocol is None:
        return []
    differ = sorted({name for other in others if other is not None for name in differences(protocol, other)})
    return [f"protocol: {summary(protocol)}"] + \
        ([f"protocol: ! evaluations differ in {', '.join(differ)}: their scores are not comparable"] if differ else [])


def _saved_spec(run: RunDir):
    try:
        return run.saved_job()
    except SpecError:
        return None


def status_lines(path, verify: bool = False) -> tuple[list[str], bool]:
    """(the status of the run at ``path``, or of its chain; whether a job of it is still queued or running)."""
    run = RunDir(path)
    spec = _saved_spec(run)
    if spec is None:
        raise UserError(f"{path}: not a run dir (no readable spec.yaml)")
    history = run.history()
    chains = [e for e in history if e["event"] == CHAIN_EVENT and isinstance(e.get("stages"), list)]
    if not chains:
        lines, active = [f"run {spec.name} ({spec.kind}) in {run.path}"], False
        for job_id in dict.fromkeys(str(e["slurm_job_id"]) for e in history if e.get("slurm_job_id")):
            line, state = job_line(job_id, history)
            lines.append(line)
            active = active or not is_final(state)
        for event in history:  # train.evaluate's jobs (idiff.train.checkpoint_evaluations)
            if event["event"] == "evaluation" and isinstance(event.get("slurm_job_ids"), list):
                job_id = str(event["slurm_job_ids"][-1])
                state, _ = slurm_state(job_id)
                lines.append(f"evaluation of step {event.get('step')}: slurm job(s) "
                             f"{', '.join(map(str, event['slurm_job_ids']))}: {state}")
                active = active or not is_final(state)
        faults = fault_lines(run.path, history, spec.resources.max_requeues)
        return (lines + run_progress(run, spec, verify) + faults + cost_line(run_cost(history)) + _history(history),
                active)
    stages = chains[-1]["stages"]
    body, states, costs = [], {}, []
    for stage in stages:
        job_id = str(stage.get("slurm_job_id"))
        stage_run = RunDir(stage["run_dir"])
        line, states[stage["stage"]] = job_line(job_id, stage_run.history()
                                                if storage.exists(stage_run.history_file) else [])
        body.append(f"stage {stage['stage']}: {stage['kind']} {stage['name']} in {stage['run_dir']}; {line}")
        stage_spec = _saved_spec(stage_run)
        if stage_spec is not None:
            body += [f"  {line}" for line in run_progress(stage_run, stage_spec, verify)]
        costs.append(run_cost(stage_run.history() if storage.exists(stage_run.history_file) else []))
        body += [f"  {line}" for line in cost_line(costs[-1])]
    running = next((s for s in stages if states[s["stage"]].startswith(("RUNNING", "COMPLETING"))), None)
    stopped = next((s for s in stages if is_final(states[s["stage"]])
                    and not states[s["stage"]].startswith(("COMPLETED", "finished"))), None)
    if running is not None:
        where = f"running stage {running['stage']} of {len(stages)} ({running['kind']} {running['name']})"
    elif stopped is not None:
        where = f"stopped: stage {stopped['stage']} ({stopped['name']}) is {states[stopped['stage']]}"
    elif all(is_final(state) for state in states.values()):
        where = "finished"
    else:
        where = "waiting in the queue"
    active = not all(is_final(state) for state in states.values())
    return [f"chain of {len(stages)} jobs: {where}", *body, *cost_line(add_costs(costs), "chain cost")], active


def _history(history: list[dict]) -> list[str]:
    if not history:
        return []
    lines = ["job history:"]
    for event in history:
        details = ", ".join(f"{k}={event[k]}" for k in ("launcher", "world_size", "slurm_job_id", "restart_count",
                                                       "status", "signal", "step") if event.get(k) not in (None, ""))
        lines.append(f"  {event['time']}  {event['event']:<5}  {details}")
    return lines


def run_dirs_below(folder: str, depth: int = 2) -> list[str]:
    """The run dirs idiff made in ``folder`` and up to ``depth`` levels below it (runs/demo, ...)."""
    found, level = [], [folder]
    for _ in range(depth):
        level = sorted(os.path.join(parent, name) for parent in level for name in os.listdir(parent)
                       if os.path.isdir(os.path.join(parent, name)) and not name.startswith("."))
        found += [path for path in level if RunDir(path).is_owned()]
    return found


def print_runs(folder: str = ".", out=None) -> int:
    """``idiff status`` without a run dir: one line per run dir below ``folder``."""
    out = out or sys.stdout
    runs = run_dirs_below(folder)
    if not runs:
        raise UserError(f"idiff status RUN_DIR: no run dir in {os.path.abspath(folder)} or the two levels below it; "
                        f"name one (e.g. idiff status runs/demo)")
    for path in runs:
        spec = _saved_spec(RunDir(path))
        progress = run_progress(RunDir(path), spec, verify=False)[:1] if spec is not None else ["unreadable spec.yaml"]
        kind = spec.kind if spec is not None else "?"
        print(f"{os.path.relpath(path, folder)}: {kind}; {progress[0] if progress else 'nothing done yet'}", file=out)
    return 0


def print_status(path, *, verify: bool = False, watch: float | None = None, sort: str | None = None,
                 out=None) -> int:
    """Print the status once, or with ``watch`` every that many seconds until no job of it is queued or running;
    a sweep's folder: a row per point, sorted by ``sort``."""
    out = out or sys.stdout
    terminal = getattr(out, "isatty", lambda: False)()
    sweep = is_sweep_dir(path)
    if sort is not None and not sweep:
        raise UserError(f"--sort: {path} is not a sweep's folder (no sweep.json); --sort orders a sweep's points")
    while True:
        lines, active = sweep_lines(path, sort) if sweep else status_lines(path, verify)
        if watch is not None and terminal:
            print("\033[H\033[J", end="", file=out)  # redraw in place
        print("\n".join(lines), file=out, flush=True)
        if watch is None or not active:
            return 0
        time.sleep(watch)
        if not terminal:
            print(file=out)


# ----------------------------------------------------------------------------- costs and sweeps
def run_cost(history: list[dict]) -> dict | None:
    """What a run's jobs cost, summed over their ``end`` records (launch.cost); None before any has one."""
    costs = [e["cost"] for e in history if e["event"] == "end" and isinstance(e.get("cost"), dict)]
    if not costs:
        return None

    def total(key, where=lambda c: True):
        return sum(c[key] for c in costs if isinstance(c.get(key), (int, float)) and where(c))

    wall, images = total("wall_s"), total("images")
    peaks = [p for c in costs for p in c.get("peak_memory_mb") or [] if isinstance(p, (int, float))]
    return {"jobs": len(costs), "wall_s": wall, "node_hours": total("node_hours"), "gpu_hours": total("gpu_hours"),
            "images_per_s": images / wall if images and wall else None,
            "s_per_kimg": 1000 * wall / images if images else None, "peak_memory_mb": max(peaks, default=None),
            "restarts": sum(1 for e in history if e["event"] == "start") - 1, "lost_steps": total("lost_steps"),
            "requeue_queued_s": total("queued_s", lambda c: (c.get("restart_count") or 0) > 0),
            "evaluation_s": total("evaluation_s"), "checkpoint_s": total("checkpoint_s")}


def add_costs(costs: list[dict | None]) -> dict | None:
    """The cost of a chain or sweep: its runs' costs added (the peak: the largest)."""
    known = [c for c in costs if c is not None]
    if not known:
        return None
    summed = {k: sum(c[k] or 0 for c in known) for k in ("jobs", "wall_s", "node_hours", "gpu_hours", "restarts",
                                                         "lost_steps", "requeue_queued_s", "evaluation_s",
                                                         "checkpoint_s")}
    return {**summed, "peak_memory_mb": max((c["peak_memory_mb"] for c in known if c["peak_memory_mb"]), default=None),
            "images_per_s": None, "s_per_kimg": None}


def cost_line(cost: dict | None, label: str = "cost") -> list[str]:
    if cost is None:
        return []
    text = (f"{label}: {cost['jobs']} job(s), wall {format_duration(cost['wall_s'])}, {cost['node_hours']:.4g} "
            f"node-h, {cost['gpu_hours']:.4g} GPU-h")
    if cost["images_per_s"]:
        text += f", {cost['images_per_s']:.3g} img/s ({cost['s_per_kimg']:.3g} s/kimg)"
    if cost["peak_memory_mb"]:
        text += f", peak {cost['peak_memory_mb']:.0f} MB/rank"
    return [text + f", {cost['restarts']} restart(s), {cost['lost_steps']} step(s) lost, "
                   f"{format_duration(cost['requeue_queued_s'])} queued after requeues, "
                   f"{format_duration(cost['evaluation_s'])} evaluating, "
                   f"{format_duration(cost['checkpoint_s'])} checkpointing"]


SWEEP_COLUMNS = ("point", "state", "step", "loss", "eval", "eta", "node-h", "GPU-h", "restarts", "lost")


def sweep_row(run: RunDir) -> dict:
    """A point's row: its Slurm state, progress, last evaluation and cost; sortable values under ``sort``."""
    history = run.history() if storage.exists(run.history_file) else []
    submitted = [str(e["slurm_job_id"]) for e in history if e["event"] == "submit" and e.get("slurm_job_id")]
    state = slurm_state(submitted[-1])[0] if submitted else \
        next((e.get("status") for e in reversed(history) if e["event"] == "end"), None) or "not run"
    row = {"point": os.path.basename(run.path), "state": state, "step": "", "loss": "", "eval": "", "eta": "",
           "sort": {}}
    spec = _saved_spec(run)
    if spec is not None and spec.kind == "train":
        last = last_log_row(run)
        if last is not None:
            total = spec.train.total_steps
            row["step"], row["sort"]["step"] = f"{last['step']}/{total}", last["step"]
            if isinstance(last.get("loss"), (int, float)):
                row["loss"], row["sort"]["loss"] = f"{last['loss']:.4g}", last["loss"]
            rate = last.get("images_per_s")
            if not is_final(state) and isinstance(rate, (int, float)) and rate > 0:
                row["eta"] = format_duration((total - last["step"]) * spec.train.batch_size / rate)
        from .train.checkpoint_evaluations import evaluated_steps

        evaluations = evaluated_steps(run.path)
        if evaluations:
            metrics = evaluations[max(evaluations)]["metrics"]
            row["eval"] = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            row["sort"].update(metrics)
    cost = run_cost(history)
    row["cost"] = cost
    if cost is not None:
        row.update({"node-h": f"{cost['node_hours']:.3g}", "GPU-h": f"{cost['gpu_hours']:.3g}",
                    "restarts": str(cost["restarts"]), "lost": str(cost["lost_steps"])})
        row["sort"].update(node_hours=cost["node_hours"], gpu_hours=cost["gpu_hours"])
    return row


def sweep_lines(path: str, sort: str | None = None) -> tuple[list[str], bool]:
    """(one row per point of the sweep in ``path``, sorted by ``sort``; whether a job of it is still queued or
    running)."""
    record = sweep_record(path)
    rows = [sweep_row(RunDir(storage.join(path, p["name"]))) for p in record["points"]]
    if sort is not None:
        known = sorted({k for row in rows for k in row["sort"]})
        if sort not in known:
            raise UserError(f"--sort {sort}: no point has it; sort by one of {', '.join(known) or '(nothing yet)'}")
        rows.sort(key=lambda row: (sort not in row["sort"], row["sort"].get(sort, 0)))
    table = [list(SWEEP_COLUMNS)] + [[str(row.get(c) or "-") for c in SWEEP_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(SWEEP_COLUMNS))]
    stage = next((s for s in record.get("stages", []) if s.get("stage") == record.get("stage")), {})
    lines = [f"sweep of {len(rows)} point(s) in {path} ({stage.get('kind', '?')}, stage {record.get('stage', 1)} of "
             f"{len(record.get('stages', [])) or 1}); arrays: "
             f"{', '.join(str(a.get('job_id')) for a in record.get('arrays', [])) or 'none'}"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines += cost_line(add_costs([row["cost"] for row in rows]), "sweep cost")
    return lines, any(not is_final(row["state"]) and row["state"] not in ("not run", "completed", "preempted")
                      for row in rows)
