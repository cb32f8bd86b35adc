"""Where this rank sits: built from torchrun, Slurm (srun or submitit) or MPI variables, in that order.

The job bodies only ever see a RankEnv; how it was built is the launcher's business.
"""

import datetime
import hashlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError

DIST_TIMEOUT = datetime.timedelta(minutes=30)  # a collective's limit without resources.hang_timeout
MIN_COLLECTIVE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RankEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    slurm_job_id: str | None = None
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            # Slurm may already restrict each task to its own GPU (CUDA_VISIBLE_DEVICES): then it is cuda:0.
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} (local {self.local_rank}, {self.launcher}, {self.device})"


def detect_rank_env(environ=None) -> RankEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        return RankEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)), launcher=env.get("IDIFF_LAUNCHER", "torchrun"),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        job_id = env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"])
        restarts = int(env.get("SLURM_RESTART_COUNT", 0))
        return RankEnv(
            rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_STEP_NUM_TASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            local_world_size=int(env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]),
            launcher="slurm",
            master_addr=first_slurm_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]),
            master_port=port_for_job(env["SLURM_JOB_ID"], restarts),
            slurm_job_id=job_id, restart_count=restarts,
        )
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMIX_RANK", "PMIX_SIZE"),
                               ("PMI_RANK", "PMI_SIZE")):
        if rank_var in env and int(env.get(size_var, 1)) > 1:
            return _mpi_env()
    return RankEnv()


def port_for_job(job_id: str, restart_count: int = 0) -> int:
    """The rendezvous port of a scheduler job: derived from its id and requeue count, so that every
    rank computes the same one and concurrent jobs sharing a node do not collide."""
    digest = int(hashlib.sha256(f"{job_id}:{restart_count}".encode()).hexdigest()[:8], 16)
    return 20000 + digest % 20000


def first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # "gpu[03-05]" -> "gpu03"
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def _mpi_env() -> RankEnv:
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise UserError(f"this process was started by MPI (mpiexec), which needs mpi4py: pip install 'idiff[mpi]' "
                        f"(and an MPI library at run time, e.g. apt install openmpi-bin) ({err})") from None

    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    address = None
    if comm.rank == 0:
        try:
            with socket.socket() as s:
                s.bind(("", 0))
                address = (socket.gethostbyname(socket.gethostname()), s.getsockname()[1])
        except OSError as err:  # the other ranks wait in bcast: only MPI_Abort ends them (and mpiexec)
            print(f"idiff: rank 0 cannot announce its address for the rendezvous: {err}", file=sys.stderr, flush=True)
            comm.Abort(1)
    address = comm.bcast(address, root=0)
    return RankEnv(rank=comm.rank, world_size=comm.size, local_rank=local.rank, local_world_size=local.size,
                   launcher="mpi",
                   master_addr=address[0], master_port=address[1])


def configure_threads(env: RankEnv, environ=None) -> int:
    """CPU threads for this rank: ranks on one node share its cores (oversubscribed OpenMP spins slow
    everything down many times). An explicit OMP_NUM_THREADS wins; Slurm's cpus-per-task is next."""
    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ:
        threads = int(environ["OMP_NUM_THREADS"])
    elif "SLURM_CPUS_PER_TASK" in environ:
        threads = int(environ["SLURM_CPUS_PER_TASK"])
    else:
        threads = max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(threads)
    return threads


_control_group = None


def control_group():
    """A gloo group for small CPU-side agreements (preemption): no GPU sync, unlike a NCCL collective."""
    return _control_group


def collective_timeout(hang_timeout_s: float | None) -> datetime.timedelta:
    """How long a collective (and the rendezvous) may wait: twice the hang timeout, so that the watchdog,
    which says where each thread waits, normally ends a hung rank first; the collective's error is the backstop
    (NCCL's own watchdog aborts the process, gloo raises)."""
    if hang_timeout_s is None:
        return DIST_TIMEOUT
    return datetime.timedelta(seconds=max(2 * hang_timeout_s, MIN_COLLECTIVE_TIMEOUT_S))


def init_distributed(env: RankEnv, timeout: datetime.timedelta = DIST_TIMEOUT) -> None:
    """Join the process group (NCCL on GPU, gloo on CPU); a single rank runs without one. ``timeout``: how
    long a collective may wait before it fails."""
    global _control_group
    if env.world_size == 1 or dist.is_initialized():
        return
    device = env.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank, world_size=env.world_size, timeout=timeout,
    )
    _control_group = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else dist.group.WORLD


def shutdown_distributed() -> None:
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None
