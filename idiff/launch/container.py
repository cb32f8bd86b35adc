"""Every rank of a Slurm job inside the spec's container (``resources.container``).

Whatever the runtime, a rank in the container sees what it would see on the node: the working
directory and the run dir at their own paths (relative paths of the spec, submitit's job folder),
the spec's further mounts, the rank's Slurm environment, and the GPUs when the job asks for some.
Docker and Podman need this spelled out: their containers are started by a daemon, not by the srun
task, so the environment is passed on by name and the user by id. Apptainer and Pyxis run the
container as the task itself, environment and user included.
"""

import os
import shlex
import shutil

from .. import storage
from ..errors import UserError
from ..jobspec.resources import MOUNT_PATH

# What a rank reads from its environment: Slurm's and submitit's description of the task (idiff's
# RankEnv, submitit.JobEnvironment), thread and GPU settings, and where runs go by default.
RANK_ENVIRONMENT = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_NTASKS",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
    "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_NODELIST",
    "SLURM_CPUS_PER_TASK", "SLURM_TASKS_PER_NODE", "SUBMITIT_EXECUTOR", "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS", "PYTHONSAFEPATH", "OPENAI_LOGDIR", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
    "NCCL_DEBUG",
)


def spec_mounts(container) -> list[tuple[str, str, str]]:
    """(host path, container path, 'ro' or 'rw') of each ``HOST[:CONTAINER][:ro]`` in ``container.mounts``."""
    mounts = []
    for mount in container.mounts:
        parts = mount.split(":")
        mode = parts.pop() if len(parts) > 1 and parts[-1] in ("ro", "rw") else "rw"
        mounts.append((parts[0], parts[-1], mode))
    return mounts


def bind_mounts(spec, cwd: str) -> list[tuple[str, str, str]]:
    """(host path, container path, 'ro' or 'rw') of every mount; the spec's own win over the automatic
    ones at the same container path."""
    automatic = [] if cwd == "/" else [cwd]
    if not storage.is_remote(spec.run_dir):
        run_dir = os.path.normpath(os.path.join(cwd, spec.run_dir))
        if not run_dir.startswith(cwd.rstrip("/") + "/"):
            automatic.append(run_dir)
    mounts = {path: (path, path, "rw") for path in automatic}
    for host, target, mode in spec_mounts(spec.resources.container):
        mounts[target] = (host, target, mode)
    return list(mounts.values())


def check_container(spec, cwd: str) -> None:
    """Refuse (exit 2, naming the field) what would fail only on the nodes: a runtime that is not
    installed, a mount of a missing host path, a working directory or run dir that cannot be mounted."""
    container = spec.resources.container
    if container.runtime != "pyxis" and shutil.which(container.runtime) is None:  # pyxis is srun's plugin
        raise UserError(f"resources.container.runtime: {container.runtime}, but there is no {container.runtime} "
                        "on PATH")
    for what, path in (("the working directory", cwd), ("run_dir", spec.run_dir)):
        if not storage.is_remote(path) and not MOUNT_PATH.fullmatch(os.path.normpath(os.path.join(cwd, path))):
            raise UserError(f"{what} {path!r} is mounted into the container, and only letters, digits and "
                            "_./@+=- are allowed in a mounted path")
    for host, _, _ in spec_mounts(container):
        if not os.path.exists(host):
            raise UserError(f"resources.container.mounts: {host} does not exist on this machine")


def srun_options(spec, cwd: str) -> list[str]:
    """srun's own options for the container: Pyxis's; the other runtimes wrap the command instead."""
    container = spec.resources.container
    if container.runtime != "pyxis":
        return []
    mounts = ",".join(f"{host}:{target}" + (":ro" if mode == "ro" else "") for host, target, mode in
                      bind_mounts(spec, cwd))
    return [f"--container-image={container.image}", f"--container-mounts={mounts}", f"--container-workdir={cwd}"]


def wrap(spec, command: list[str], cwd: str) -> list[str]:
    """The argv that runs ``command`` (argv[0] found on the image's PATH) in the container."""
    container = spec.resources.container
    mounts = bind_mounts(spec, cwd)
    gpus = spec.resources.gpus_per_node > 0
    if container.runtime in ("docker", "podman"):
        argv = [container.runtime, "run", "--rm", "--init", "--network", "host", "--ipc", "host"]
        # Rootless Podman maps the caller's id into the container with keep-id; Docker is told the ids.
        argv += ["--userns", "keep-id"] if container.runtime == "podman" else ["--user", f"{os.getuid()}:{os.getgid()}"]
        for host, target, mode in mounts:
            argv += ["--volume", f"{host}:{target}:{mode}"]
        argv += ["--workdir", cwd]
        for name in RANK_ENVIRONMENT:
            argv += ["--env", name]  # the value the srun task has, if it has one
        if gpus:
            argv += ["--gpus", "all"] if container.runtime == "docker" else ["--device", "nvidia.com/gpu=all"]
        return [*argv, "--entrypoint", command[0], container.image, *command[1:]]
    if container.runtime == "apptainer":
        binds = ",".join(f"{host}:{target}:{mode}" for host, target, mode in mounts)
        return ["apptainer", "exec", *(["--nv"] if gpus else []), "--bind", binds, "--pwd", cwd,
                container.image, *command]
    return list(command)  # pyxis: srun itself starts the task in the container (srun_options)


REQUEUE_MARKER = "requeue"  # in a job's submitit folder: rank 0 in a container asks for a requeue


def container_setup(jobs_folder) -> list[str]:
    """Lines of the batch script (on the node, outside the container) of a containerised job;
    ``jobs_folder`` holds submitit's folder of each job, named by its id."""
    marker = f'{shlex.quote(str(jobs_folder))}/"$SLURM_JOB_ID"/{REQUEUE_MARKER}'
    return [
        # `python -m` puts the working directory first on sys.path, where a checkout of idiff (mounted
        # with it) would shadow the image's own.
        "export PYTHONSAFEPATH=1",
        f"requeue_if_asked() {{ if [[ -e {marker} ]]; then rm -f {marker}; scontrol requeue \"$SLURM_JOB_ID\"; fi; }}",
        "trap requeue_if_asked EXIT",
    ]
