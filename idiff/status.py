"""``idiff status RUN_DIR``: where a run stands, from its files (and Slurm's accounting when there)."""

import shutil
import subprocess

from .checkpoints import CheckpointStore
from .errors import UserError
from .run_dir import RunDir
from .train.metrics import MetricsLog


def slurm_job_states(job_id: str) -> list[dict]:
    """Every run of a Slurm job (requeues included), from sacct; empty without accounting."""
    if not shutil.which("sacct"):
        return []
    try:
        out = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State,Start,End,ExitCode", "-j", job_id],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
    return [dict(zip(("job_id", "state", "start", "end", "exit_code"), row)) for row in rows if len(row) == 5]


def print_status(path) -> int:
    run = RunDir(path)
    spec = run.saved_spec()
    if spec is None:
        raise UserError(f"{path}: not a run dir (no spec.yaml)")
    print(f"run {spec.get('name')} ({spec.get('kind')}) in {run.path}")
    store = CheckpointStore(run.checkpoints)
    steps = store.steps()
    if steps:
        latest = store.latest_complete()
        if latest is None:
            print("checkpoints: none complete")
        else:
            manifest = store.manifest(latest)
            print(f"last complete checkpoint: step {latest}, {manifest.get('images_seen', '?')} images seen "
                  f"({store.manifest_path(latest)})")
        broken = [s for s in steps if s != latest and store.problem(s)]
        if broken:
            print(f"incomplete or corrupt checkpoints: {', '.join(map(str, broken))}")
    rows = MetricsLog(run.path).rows()
    if rows:
        last = rows[-1]
        loss = last.get("loss")
        loss = f"{loss:.5f}" if isinstance(loss, (int, float)) else "?"
        print(f"last log: step {last['step']}, {last.get('images_seen', '?')} images seen, loss {loss}")
    history = run.history()
    if history:
        print("job history:")
        for event in history:
            details = ", ".join(f"{k}={event[k]}" for k in ("launcher", "world_size", "slurm_job_id", "restart_count",
                                                           "status", "signal") if event.get(k) not in (None, ""))
            print(f"  {event['time']}  {event['event']:<5}  {details}")
    job_ids = sorted({e["slurm_job_id"] for e in history if e.get("slurm_job_id")}, key=str)
    for job_id in job_ids:
        runs = slurm_job_states(job_id)
        if runs:
            states = ", ".join(r["state"] for r in runs)
            print(f"slurm job {job_id}: {states} ({max(len(runs) - 1, 0)} requeue(s))")
    return 0
