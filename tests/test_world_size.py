"""Training does not depend on the world size: the same global batch, timesteps and noise at every step."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import (
    TEST_ENV,
    assert_same_function,
    assert_same_tensors,
    final_files,
    idiff_in_process,
    require_service,
    tiny_spec,
    write_spec,
)

# Processes, real training and Inception: minutes on 2 cores, so `make test-all` (and CI) runs them.
pytestmark = pytest.mark.slow

STEPS = 6


def train(shapes_dir, root, name, **train_overrides):
    spec = tiny_spec(shapes_dir, root / name, max_steps=STEPS, save_interval=STEPS,
                     schedule_sampler="loss-second-moment", **train_overrides)
    path = write_spec(root / f"{name}.yaml", spec)
    return path, root / name


def logged_losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank(shapes_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    path, run_dir = train(shapes_dir, root, "w1")
    idiff_in_process("train", path)
    return root, run_dir


@pytest.mark.slow  # starts the ranks, each a Python that imports torch
@pytest.mark.parametrize("nproc,microbatch", [(2, None), (4, 1)])
def test_weights_agree_across_world_sizes_to_float_rounding(shapes_dir, one_rank, nproc, microbatch, capfd):
    root, reference = one_rank
    path, run_dir = train(shapes_dir, root, f"w{nproc}", microbatch=microbatch)
    idiff_in_process("train", path, "--nproc", nproc)
    assert f"= {nproc} ranks x {8 // nproc}" in capfd.readouterr().err  # rank 0's line
    # Same images, timesteps and noise: per-step losses agree to float rounding.
    for a, b in zip(logged_losses(reference), logged_losses(run_dir)):
        assert a == pytest.approx(b, rel=1e-5)
    assert_same_function(final_files(run_dir, STEPS), final_files(reference, STEPS))


@pytest.mark.mpi
@pytest.mark.slow
def test_mpiexec_and_local_ranks_agree_bit_for_bit(shapes_dir, tmp_path):
    mpiexec = shutil.which("mpiexec")
    require_service(None if mpiexec else "mpiexec not found: install Open MPI (Debian: apt install openmpi-bin)")
    local_path, local_dir = train(shapes_dir, tmp_path, "local")
    idiff_in_process("train", local_path, "--nproc", 2)
    mpi_path, mpi_dir = train(shapes_dir, tmp_path, "mpi")
    result = subprocess.run([mpiexec, "-n", "2", "--oversubscribe", sys.executable, "-m", "idiff.cli", "train",
                             mpi_path], capture_output=True, text=True, timeout=300, env=TEST_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(local 0, mpi, cpu)" in result.stderr
    assert_same_tensors(final_files(mpi_dir, STEPS), final_files(local_dir, STEPS))
