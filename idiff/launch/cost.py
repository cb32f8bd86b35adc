"""What a job cost: the ``cost`` of its ``end`` record in ``jobs.jsonl`` (runner.run_job), summed by ``idiff status``
per run, chain and sweep.

| field | what |
|---|---|
| ``wall_s`` | seconds from the job's start on this rank to its end (set-up and the last checkpoint included) |
| ``nodes``, ``gpus`` | the allocation: Slurm's node count and GPUs (all nodes); here 1 node and the ranks' GPUs |
| ``node_hours``, ``gpu_hours`` | ``wall_s`` x nodes (x GPUs) / 3600: what a cluster charges; GPU-hours are 0 on CPUs |
| ``images``, ``images_per_s``, ``s_per_kimg`` | training images processed by this job (steps done x global batch) |
| ``peak_memory_mb`` | per rank: CUDA's max allocated on a GPU, else the process's peak RSS (getrusage) |
| ``restart_count`` | Slurm's requeues of this job before this start (SLURM_RESTART_COUNT) |
| ``lost_steps`` | steps the job trains again: logged by an earlier job past the checkpoint it resumed from |
| ``queued_s`` | seconds from (re)queueing to the start, from Slurm's accounting (sacct): lost after a requeue |
| ``evaluation_s`` | seconds the job spent evaluating its checkpoints itself (``train.evaluate`` off Slurm) |
| ``checkpoint_s`` | seconds training spent on checkpoints: copying the state for the background writer, waiting |
|                  | for it (at the end, on a stop, before the next save) |
"""

import os
import resource
import subprocess
import sys
import time
import warnings
from datetime import datetime

import torch
import torch.distributed as dist

from ..checkpoints import CheckpointStore
from ..run_dir import RunDir
from ..train.training_log import last_log_row


def _newest_checkpoint(run_dir: RunDir) -> int:
    store = CheckpointStore(run_dir.checkpoints)
    return next((step for step in reversed(store.steps()) if store.problem(step, hashes=False) is None), 0)


def _last_logged_step(run_dir: RunDir) -> int | None:
    with warnings.catch_warnings():  # unreadable lines: the training log warns of them once, as it reads them
        warnings.simplefilter("ignore")
        row = last_log_row(run_dir)
    return row["step"] if row is not None else None


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory: CUDA's max allocated on its GPU, else its peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _allocation(env) -> tuple[int, int]:
    """(nodes, GPUs) of the job's allocation."""
    if env.slurm_job_id:
        nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
        per_node = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_GPUS_PER_NODE") or "0"
        return nodes, nodes * int(per_node.rsplit(":", 1)[-1] or 0)
    return 1, env.world_size if env.device.type == "cuda" else 0


def sacct_queued_s(job_id: str) -> float | None:
    """Seconds this run of Slurm job ``job_id`` waited in the queue (its submission, or requeue, to its start)."""
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "Submit,Start", "-j", job_id], capture_output=True,
                             text=True, timeout=30)
        submit, start = out.stdout.strip().splitlines()[-1].split("|")
        return max(0.0, (datetime.fromisoformat(start) - datetime.fromisoformat(submit)).total_seconds())
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None  # no sacct, no accounting (slurmdbd), or the job is not in it yet


class CostMeter:
    """Started as a job starts (before a resumed run drops the log rows past its checkpoint), read at its end."""

    def __init__(self, spec, env):
        self.spec, self.env = spec, env
        self.started = time.monotonic()
        self.evaluation_s = 0.0  # added to by the hooks that evaluate checkpoints here
        self.checkpoint_s = 0.0  # set by the training loop at its end
        self.start_step = self.lost_steps = None
        if spec.kind == "train" and env.is_main:
            run_dir = RunDir(spec.run_dir)
            self.start_step = _newest_checkpoint(run_dir)
            logged = _last_logged_step(run_dir)
            self.lost_steps = max(0, logged - self.start_step) if logged is not None else 0

    def finish(self, status: str) -> dict:
        """The cost of the job; a collective (each rank's peak memory) unless it failed, where ranks may be gone."""
        wall = round(time.monotonic() - self.started, 3)
        peak = peak_memory_mb(self.env.device)
        peaks = [peak]
        if status != "failed" and self.env.world_size > 1 and dist.is_initialized():
            peaks = [None] * self.env.world_size
            dist.all_gather_object(peaks, peak)
        nodes, gpus = _allocation(self.env)
        cost = {"wall_s": wall, "nodes": nodes, "gpus": gpus, "node_hours": nodes * wall / 3600,
                "gpu_hours": gpus * wall / 3600, "peak_memory_mb": [round(p, 1) for p in peaks],
                "restart_count": self.env.restart_count, "evaluation_s": round(self.evaluation_s, 3),
                "checkpoint_s": round(self.checkpoint_s, 3)}
        if self.start_step is not None:
            images = (_newest_checkpoint(RunDir(self.spec.run_dir)) - self.start_step) * self.spec.train.batch_size
            cost.update(images=images, images_per_s=images / wall if wall else 0.0,
                        s_per_kimg=1000 * wall / images if images else None, lost_steps=self.lost_steps)
        if self.env.slurm_job_id:
            cost["queued_s"] = sacct_queued_s(self.env.slurm_job_id)
        return cost
