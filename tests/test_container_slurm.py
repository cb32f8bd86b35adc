"""Slurm jobs in the image (resources.container): the command line each runtime gets, the refusals
before anything is submitted, and real jobs on the local 2-node cluster whose ranks run in Docker.

Apptainer and Pyxis cannot be installed here: their command lines are checked word for word (and
documented in docker/README.md). Docker runs for real, through idiff-submit and slurm/train.sbatch.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    TEST_ENV,
    TEST_IMAGE,
    assert_same_tensors,
    docker_problem,
    final_files,
    idiff,
    require_service,
    slurm_cluster_problem,
    tiny_spec,
    wait_for_step,
    write_spec,
)

from idiff.cli import main as idiff_main
from idiff.jobspec.load import parse_spec
from idiff.launch.commands import main as submit_main
from idiff.launch.container import REQUEUE_MARKER, container_setup, srun_options, wrap

REPO = Path(__file__).resolve().parents[1]
PROJECT = "/home/ada/project"  # the working directory the job is submitted from


def container_spec(run_dir="/scratch/runs/x", gpus=0, **container) -> object:
    spec = tiny_spec("/datasets/shapes", run_dir)
    spec["resources"] = {"nodes": 2, "gpus_per_node": gpus, "container": container}
    return parse_spec(spec)


# ----------------------------------------------------------------------------- command lines
def test_apptainer_execs_the_image_with_gpus_binds_and_the_working_directory():
    spec = container_spec(gpus=4, image="/images/idiff.sif", runtime="apptainer", mounts=["/datasets:ro"])
    assert wrap(spec, ["python"], PROJECT) == [
        "apptainer", "exec", "--nv",
        "--bind", f"{PROJECT}:{PROJECT}:rw,/scratch/runs/x:/scratch/runs/x:rw,/datasets:/datasets:ro",
        "--pwd", PROJECT, "/images/idiff.sif", "python",
    ]
    assert srun_options(spec, PROJECT) == []
    cpu_only = container_spec(image="/images/idiff.sif", runtime="apptainer")
    assert "--nv" not in wrap(cpu_only, ["python"], PROJECT)


def test_pyxis_is_srun_options_and_the_command_unchanged():
    spec = container_spec(gpus=8, image="nvcr.io#nvidia/pytorch:24.01-py3", runtime="pyxis",
                          mounts=["/datasets/imagenet:/data:ro"])
    assert srun_options(spec, PROJECT) == [
        "--container-image=nvcr.io#nvidia/pytorch:24.01-py3",
        f"--container-mounts={PROJECT}:{PROJECT},/scratch/runs/x:/scratch/runs/x,/datasets/imagenet:/data:ro",
        f"--container-workdir={PROJECT}",
    ]
    assert wrap(spec, ["python"], PROJECT) == ["python"]


def test_docker_and_podman_run_on_the_hosts_network_as_the_user_with_the_rank_environment():
    spec = container_spec(gpus=2, image="registry.example.org/idiff:1.0", runtime="docker")
    argv = wrap(spec, ["python"], PROJECT)
    assert argv[:8] == ["docker", "run", "--rm", "--init", "--network", "host", "--ipc", "host"]
    assert argv[-3:] == ["--entrypoint", "python", "registry.example.org/idiff:1.0"]
    pairs = list(zip(argv[8:-3:2], argv[9:-3:2], strict=True))
    assert ("--user", f"{os.getuid()}:{os.getgid()}") in pairs and ("--gpus", "all") in pairs
    assert ("--volume", f"{PROJECT}:{PROJECT}:rw") in pairs and ("--workdir", PROJECT) in pairs
    passed = {value for option, value in pairs if option == "--env"}
    # what a rank is made of, for idiff (RankEnv) and submitit (JobEnvironment)
    assert {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
            "SLURM_STEP_NUM_TASKS", "SLURM_RESTART_COUNT", "SUBMITIT_EXECUTOR", "CUDA_VISIBLE_DEVICES"} <= passed
    podman = wrap(container_spec(gpus=2, image="idiff", runtime="podman"), ["idiff"], PROJECT)
    assert podman[0] == "podman" and "--user" not in podman
    assert "--userns" in podman and podman[podman.index("--userns") + 1] == "keep-id"
    assert "--device" in podman and podman[podman.index("--device") + 1] == "nvidia.com/gpu=all"
    assert "--gpus" not in wrap(container_spec(image="idiff", runtime="docker"), ["idiff"], PROJECT)


def test_a_spec_with_the_old_container_image_key_still_means_a_pyxis_image():
    spec = tiny_spec("/datasets/shapes", "/scratch/runs/x")
    spec["resources"] = {"container_image": "nvcr.io#nvidia/pytorch:24.01-py3"}
    container = parse_spec(spec).resources.container
    assert (container.image, container.runtime, container.mounts) == ("nvcr.io#nvidia/pytorch:24.01-py3", "pyxis", [])


def test_mounts_a_run_dir_only_outside_the_working_directory_and_the_specs_own_mounts_win():
    inside = container_spec(run_dir="runs/x", image="i", runtime="apptainer", mounts=[f"{PROJECT}:ro"])
    argv = wrap(inside, ["python"], PROJECT)
    assert argv[argv.index("--bind") + 1] == f"{PROJECT}:{PROJECT}:ro"
    remote = container_spec(run_dir="gs://bucket/runs/x", image="i", runtime="apptainer")
    argv = wrap(remote, ["python"], PROJECT)
    assert argv[argv.index("--bind") + 1] == f"{PROJECT}:{PROJECT}:rw"


def test_srun_prefix_is_what_the_sbatch_scripts_put_between_srun_and_the_job(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = tiny_spec("data", "runs/x")
    spec["resources"] = {"container": {"image": "/images/idiff.sqsh", "runtime": "pyxis"}}
    write_spec(tmp_path / "x.yaml", spec)
    assert idiff_main(["srun-prefix", "train", "x.yaml", "--set", "train.lr=2e-4"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "--container-image=/images/idiff.sqsh", f"--container-mounts={tmp_path}:{tmp_path}",
        f"--container-workdir={tmp_path}", "idiff"]
    del spec["resources"]
    write_spec(tmp_path / "plain.yaml", spec)
    assert idiff_main(["srun-prefix", "train", "plain.yaml"]) == 0
    assert capsys.readouterr().out == ""  # the script runs $IDIFF itself


def test_the_batch_script_requeues_when_rank_0_in_the_container_asks(tmp_path):
    """The setup lines, run by bash as the batch script would, with a folder name full of shell syntax."""
    jobs = tmp_path / "it's $HOME; `x` \"q\""
    (jobs / "7").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')  # records what Slurm would do
    (bin_dir / "scontrol").chmod(0o755)
    script = "\n".join([*container_setup(jobs), 'echo "PYTHONSAFEPATH=$PYTHONSAFEPATH"', "exit 75"])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    quiet = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert quiet.returncode == 75 and "PYTHONSAFEPATH=1" in quiet.stdout and not calls.exists()
    (jobs / "7" / REQUEUE_MARKER).touch()
    asked = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env)
    assert asked.returncode == 75, asked.stderr
    assert calls.read_text() == "requeue 7\n" and not (jobs / "7" / REQUEUE_MARKER).exists()


# ----------------------------------------------------------------------------- refusals
def refused(tmp_path, capsys, resources=None, run_dir=None, dry_run=True, **spec_keys) -> str:
    """idiff-submit on a spec with these values exits 2 before anything is written or submitted."""
    run = run_dir or str(tmp_path / "run")
    spec = {**tiny_spec(tmp_path / "data", run), **spec_keys}
    spec["resources"] = resources or {}
    path = write_spec(tmp_path / "bad.yaml", spec)
    assert submit_main([path, *(["--dry-run"] if dry_run else [])]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert not Path(run).exists()
    return err


@pytest.mark.parametrize("field, value", [
    ("image", "idiff:ci; rm -rf ~"), ("image", "idiff\nrm -rf ~"), ("image", "$(id)"), ("image", "--privileged"),
    ("mounts", ["/data:/data;id"]), ("mounts", ["/data\n/x"]), ("mounts", ["/data `id`"]), ("mounts", ["data"]),
])
def test_container_values_with_shell_syntax_are_refused(tmp_path, capsys, field, value):
    container = {"image": "idiff", "runtime": "pyxis", field: value}
    err = refused(tmp_path, capsys, {"container": container})
    assert f"resources.container.{field}" in err


def test_a_mount_of_a_missing_host_path_is_refused(tmp_path, capsys):
    container = {"image": "idiff", "runtime": "pyxis", "mounts": [f"{tmp_path}/no-such-data:/data:ro"]}
    err = refused(tmp_path, capsys, {"container": container}, dry_run=False)
    assert f"resources.container.mounts: {tmp_path}/no-such-data does not exist" in err


def test_docker_runtime_without_docker_on_path_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker there
    err = refused(tmp_path, capsys, {"container": {"image": "idiff", "runtime": "docker"}}, dry_run=False)
    assert "resources.container.runtime: docker, but there is no docker on PATH" in err


@pytest.mark.parametrize("field, resources", [
    ("resources.partition", {"partition": "gpu\n#SBATCH --qos=high"}),
    ("resources.account", {"account": "lab\rmine"}),
    ("resources.qos", {"qos": "normal\x00"}),
    ("resources.constraint", {"constraint": "a100\ntouch /tmp/pwned"}),
    ("resources.slurm_extra", {"slurm_extra": {"comment": "ok\ntouch /tmp/pwned"}}),
    ("resources.slurm_extra", {"slurm_extra": {"mail-user\ntouch /tmp/pwned": "me"}}),
    ("resources.slurm_extra", {"slurm_extra": {"mail-user me": "x"}}),
])
def test_control_characters_in_values_that_reach_the_batch_script_are_refused(tmp_path, capsys, field, resources):
    err = refused(tmp_path, capsys, resources)
    assert f"{field}:" in err and "\n#SBATCH" not in err and "\ntouch" not in err


def test_a_run_dir_with_a_newline_is_refused(tmp_path, capsys):
    err = refused(tmp_path, capsys, run_dir=str(tmp_path / "run\ntouch pwned"))
    assert "run_dir: control characters ('\\n')" in err


def test_values_without_control_characters_reach_the_batch_script_as_text(tmp_path):
    """Quotes, $ and ; in the run dir and an sbatch option are quoted: the script, run by bash with srun
    recording its arguments, runs nothing of them."""
    require_service(slurm_cluster_problem())  # submitit builds sbatch scripts only where srun exists
    from idiff.launch.submit import executor_for

    nasty = "it's $(touch pwned); `touch pwned`"
    spec = tiny_spec(tmp_path / "data", tmp_path / nasty)
    spec["resources"] = {"cpus_per_task": 1, "slurm_extra": {"comment": nasty}}
    executor = executor_for(parse_spec(spec))._executor
    script = executor._make_submission_file_text(executor._submitit_command_str, "x")
    assert "#SBATCH --comment='it'\"'\"'s $(touch pwned); `touch pwned`'" in script.splitlines()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > srun.args\n')
    (bin_dir / "srun").chmod(0o755)
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert not list(tmp_path.rglob("pwned"))
    assert f"{tmp_path / nasty}/slurm/%j" in (tmp_path / "srun.args").read_text().splitlines()


# ----------------------------------------------------------------------------- on the cluster, in Docker
STEPS = 60


@pytest.fixture(scope="module")
def cluster_and_image():
    require_service(slurm_cluster_problem())
    require_service(docker_problem())


@pytest.fixture(scope="module")
def reference(cluster_and_image, shapes_dir, tmp_path_factory):
    """The same spec on 2 local ranks on the host, uninterrupted."""
    root = tmp_path_factory.mktemp("container-slurm")
    spec = tiny_spec(shapes_dir, root / "local", max_steps=STEPS, save_interval=10)
    idiff("train", write_spec(root / "local.yaml", spec), "--nproc", 2)
    return {"root": root, "final": final_files(root / "local", STEPS)}


def docker_spec(reference, shapes_dir, name) -> tuple[str, Path]:
    run_dir = reference["root"] / name
    spec = tiny_spec(shapes_dir, run_dir, max_steps=STEPS, save_interval=10)
    spec["resources"] = {"nodes": 2, "cpus_per_task": 1, "timeout_min": 10, "signal_delay_s": 60,
                         "container": {"image": TEST_IMAGE, "runtime": "docker", "mounts": [f"{shapes_dir}:ro"]}}
    return write_spec(reference["root"] / f"{name}.yaml", spec), run_dir


def sacct_state(job: str) -> str:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job], capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    return lines[-1].split()[0] if lines else "UNKNOWN"


def wait_until_done(job: str, timeout=300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = sacct_state(job)
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} is {sacct_state(job)} after {timeout} s")


def containers_started(since: float) -> int:
    """Containers of the test image started since then (each rank of each run is one)."""
    out = subprocess.run(["docker", "events", "--since", f"{since:.0f}", "--until", f"{time.time():.0f}",
                          "--filter", "event=start", "--filter", f"image={TEST_IMAGE}", "--format", "{{.ID}}"],
                         capture_output=True, text=True, timeout=60, check=True)
    return len(out.stdout.split())


@pytest.mark.slurm
@pytest.mark.docker
def test_submitted_docker_job_is_preempted_requeued_and_ends_equal_to_two_local_ranks(reference, shapes_dir):
    path, run_dir = docker_spec(reference, shapes_dir, "submitted")
    started = time.time() - 1
    out = subprocess.run([str(Path(sys.executable).parent / "idiff-submit"), path], capture_output=True, text=True,
                         timeout=120, env=TEST_ENV, check=True).stdout
    job = out.split("submitted job ")[1].split()[0]
    try:
        wait_for_step(run_dir, 10)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)  # to each rank's `docker run`
        assert wait_until_done(job) == "COMPLETED"
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    history = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    ends = [e for e in history if e["event"] == "end"]
    assert [e["status"] for e in ends] == ["preempted", "completed"] and ends[0]["signal"] == "SIGUSR2"
    assert [e["restart_count"] for e in history if e["event"] == "start"] == [0, 1]
    assert_same_tensors(final_files(run_dir, STEPS), reference["final"])
    script = (run_dir / "slurm" / job / f"{job}_submission.sh").read_text()
    assert f"--entrypoint python {TEST_IMAGE} -u -m submitit.core._submit" in script
    assert containers_started(started) == 4  # 2 ranks, twice


@pytest.mark.slurm
@pytest.mark.docker
def test_plain_sbatch_script_runs_each_rank_in_the_container(reference, shapes_dir):
    path, run_dir = docker_spec(reference, shapes_dir, "sbatch")
    started = time.time() - 1
    out = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--time=10", f"--output={reference['root']}/sbatch-%j.out", str(REPO / "slurm" / "train.sbatch"), path],
        capture_output=True, text=True, check=True, cwd=reference["root"],  # the project, spec included
        env={**TEST_ENV, "IDIFF": str(Path(sys.executable).parent / "idiff")})
    job = out.stdout.strip().split(";")[0]
    try:
        assert wait_until_done(job) == "COMPLETED", (reference["root"] / f"sbatch-{job}.out").read_text()
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert "rank 0/2 (local 0, slurm, cpu)" in (reference["root"] / f"sbatch-{job}.out").read_text()
    assert_same_tensors(final_files(run_dir, STEPS), reference["final"])
    assert containers_started(started) == 2
