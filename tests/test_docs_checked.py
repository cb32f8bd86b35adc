"""The docs are checked: every file, command and flag that the README, docs/, the other READMEs and the comments
of jobs/ name exists, and every spec section has a description."""

import re
import shlex
from pathlib import Path

import pytest

from idiff.cli import make_parser
from idiff.jobspec.docs import SECTIONS
from idiff.jobspec.flags import flag_fields
from idiff.launch.commands import main as submit_main

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "slurm" / "README.md",
        REPO / "docker" / "README.md", REPO / "benchmarks" / "README.md"]
JOB_COMMENTS = {path: "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))
                for path in sorted((REPO / "jobs").glob("*.yaml"))}
TEXTS = {**{path: path.read_text() for path in DOCS if path.exists()}, **JOB_COMMENTS}
# Paths of the repository; what a job or benchmark writes (runs/, data/, weights/, benchmarks/results/) is not.
REPO_PATH = re.compile(r"^(?:idiff|jobs|docs|slurm|docker|benchmarks|tests|\.ci)/[\w./-]*[\w/]$")


def code_of(path: Path) -> list[str]:
    """The code a text shows: fenced blocks, `inline code` and link targets (a job's comments: all of them)."""
    text = TEXTS[path]
    if path.suffix == ".yaml":
        return [line.lstrip("# ").strip() for line in text.splitlines()]
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    return [*fenced, *re.findall(r"`([^`\n]+)`", rest), *re.findall(r"\]\(([^)\s]+)\)", rest)]


def subcommands(parser) -> dict:
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def options(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def test_every_spec_section_has_a_description():
    for name, cls in SECTIONS:
        assert (cls.__doc__ or "").strip(), f"section {name} ({cls.__name__}) has no description"


@pytest.mark.parametrize("path", list(TEXTS), ids=lambda p: str(p.relative_to(REPO)))
def test_every_repository_path_named_exists(path):
    # (comments inside code aside: "# docker/podman: an image" names runtimes, not a path)
    words = {word.strip(".,;:()'\"") for code in code_of(path) for line in code.splitlines()
             for word in line.split("#")[0].split()}
    missing = sorted(word for word in words if REPO_PATH.match(word) and "*" not in word
                     and not word.startswith("benchmarks/results/") and not (REPO / word).exists())
    assert not missing, f"{path.relative_to(REPO)} names what does not exist: {missing}"


COMMAND = re.compile(r"(?:^|\$ |&& |\| )(idiff(?:-submit|-resume|-collect)?(?: [^#&|]*)?)")


def commands(path: Path):
    """Each `idiff ...` / `idiff-submit ...` command line of the text's code, continuations joined."""
    for code in code_of(path):
        for line in code.replace("\\\n", " ").splitlines():
            for match in COMMAND.finditer(line.strip()):
                try:
                    yield shlex.split(match.group(1))
                except ValueError:
                    continue


@pytest.mark.parametrize("path", list(TEXTS), ids=lambda p: str(p.relative_to(REPO)))
def test_every_idiff_command_and_flag_named_exists(path, capsys):
    parser = make_parser()
    commands_of = subcommands(parser)
    submit_options = set()
    try:
        submit_main(["--help"])
    except SystemExit:
        submit_options = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
    problems = []
    for words in commands(path):
        program, args = words[0], [w for w in words[1:] if not w.startswith(("<", "["))]
        flags = [w.split("=")[0] for w in args if w.startswith("--")]
        if program in ("idiff-submit", "idiff-resume"):
            problems += [f"{program} {flag}" for flag in flags if flag not in submit_options | {"--help"}]
            continue
        if program != "idiff" or not args or args[0].startswith("-") or args[0] in ("...", "COMMAND"):
            continue
        if args[0] not in commands_of:
            problems.append(f"idiff {args[0]}")
            continue
        sub = commands_of[args[0]]
        known = options(sub)
        if args[0] == "data" and len(args) > 1 and not args[1].startswith("-"):
            if args[1] not in subcommands(sub):
                problems.append(f"idiff data {args[1]}")
                continue
            known = options(subcommands(sub)[args[1]])
        if args[0] in ("train", "sample", "evaluate"):
            known |= {f"--{name}" for name in flag_fields(args[0])} | {"--use_fp16", "--fp16_scale_growth"}
        if args[0] == "spec" and "--from-flags" in args[:-1]:
            kind = args[args.index("--from-flags") + 1]
            known |= {f"--{name}" for name in flag_fields(kind)} if kind in ("train", "sample", "evaluate") else set()
        if args[0] == "collect":
            continue  # idiff-collect's own parser
        problems += [f"idiff {args[0]} {flag}" for flag in flags if flag not in known | {"--help"}]
    assert not problems, f"{path.relative_to(REPO)} names commands or flags that do not exist: {problems}"
