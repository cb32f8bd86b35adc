"""The README's quick start, line by line, as a newcomer types it: training lines run (shortened to 2 steps),
and the lines that need a service are checked for the answer they give without it."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_ENV, idiff_in_process

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--set", "train.max_steps=2", "--set", "train.save_interval=2", "--set", "train.sample_grid=0"]

pytestmark = pytest.mark.slow  # trains (briefly) on one and two ranks


def quick_start_lines() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"^## Quick start\n\n```bash\n(.*?)^```", text, re.M | re.S).group(1)
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.split("#")[0].strip()]


def test_the_quick_start_runs_as_written(tmp_path, monkeypatch):
    shutil.copytree(REPO / "jobs", tmp_path / "jobs")
    monkeypatch.chdir(tmp_path)
    lines = quick_start_lines()
    assert [words[0] for words in lines][:2] == ["idiff", "idiff"] and any(w[0] == "idiff-submit" for w in lines)
    for words in lines:
        if words[0] == "mpiexec":
            if shutil.which("mpiexec") is None:
                continue  # no MPI here: nothing of idiff's to check
            subprocess.run([*words[:3], "--oversubscribe", sys.executable, "-m", "idiff.cli", *words[4:], *SHORT],
                           check=True, capture_output=True, env=TEST_ENV, timeout=300)
        elif words[0] == "idiff-submit":
            # Its data set is not here: refused (exit 2) before anything is written or submitted, Slurm or not.
            submitted = subprocess.run([str(Path(sys.executable).parent / "idiff-submit"), *words[1:]],
                                       capture_output=True, text=True, env=TEST_ENV, timeout=120)
            assert submitted.returncode == 2, submitted.stderr
            assert "train.data_dir: data/cifar_train does not exist" in submitted.stderr
            assert "Traceback" not in submitted.stderr and not (tmp_path / "runs" / "cifar10_hybrid").exists()
        elif words[1] == "train":
            idiff_in_process(*words[1:], *SHORT)
        else:
            result = idiff_in_process(*words[1:])
            if words[1] == "status":
                assert result.stdout.startswith("run demo (train) in runs/demo"), result.stdout
                assert "last log: step 2/2 (100.0%)" in result.stdout
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "model000002.pt").exists()
