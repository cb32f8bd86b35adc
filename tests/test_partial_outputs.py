"""Outputs are whole or named for what they hold: ``idiff-collect`` refuses while shards are missing for the spec's
``num_samples`` (unless ``--partial``, whose output name counts the images it holds), and the hidden partial files
of a killed ``idiff-collect`` or ``idiff data`` are removed by the next run of the same command."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import TEST_ENV, TINY_MODEL, idiff

from idiff.collect import main as collect_main
from idiff.jobspec.load import parse_spec
from idiff.run_dir import claim_run_dir
from idiff.shards import write_shard
from idiff.storage import partial_name

SIZE = 8


def sample_run(tmp_path, num_samples: int, drawn: list[tuple[int, int]]):
    """A sample run dir taken for a job of ``num_samples`` images, with the shards of ``drawn`` written."""
    spec = parse_spec({"kind": "sample", "name": "s", "run_dir": str(tmp_path / "run"),
                       "model": {**TINY_MODEL, "image_size": SIZE, "channel_mult": "1"},
                       "sample": {"model_path": "m.pt", "num_samples": num_samples}})
    run = claim_run_dir(spec)
    for start, end in drawn:
        write_shard(run.samples, start, end, {"arr_0": np.full((end - start, SIZE, SIZE, 3), start, np.uint8)})
    return run


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_collect_refuses_while_the_specs_last_shards_are_missing(tmp_path, capsys):
    run = sample_run(tmp_path, 20, [(0, 8), (8, 16)])  # still drawing 16..20
    assert collect_main([run.path]) == 2
    assert "missing sample indices [16, 20) of the 20 that the spec asks for" in capsys.readouterr().err
    assert not [n for n in os.listdir(run.path) if n.startswith("samples_")]

    assert collect_main([run.path, "--partial"]) == 0
    assert "partial output: 16 images" in capsys.readouterr().err
    with np.load(os.path.join(run.path, f"samples_16x{SIZE}x{SIZE}x3.npz")) as data:
        assert data["arr_0"].shape == (16, SIZE, SIZE, 3)


def test_collect_of_a_complete_run_writes_all_of_it(tmp_path):
    run = sample_run(tmp_path, 12, [(0, 8), (8, 12)])
    assert collect_main([run.path]) == 0
    assert os.path.exists(os.path.join(run.path, f"samples_12x{SIZE}x{SIZE}x3.npz"))


def test_a_killed_collects_hidden_file_is_removed_by_the_next_collect(tmp_path, capsys):
    run = sample_run(tmp_path, 12, [(0, 8), (8, 12)])
    output = f"samples_12x{SIZE}x{SIZE}x3.npz"
    pid = dead_pid()
    left = os.path.join(run.path, partial_name(output).replace(f"-{os.getpid()}-", f"-{pid}-"))
    live = os.path.join(run.path, partial_name(output))  # this process's own, being written: left alone
    for path in (left, live):
        with open(path, "wb") as f:
            f.write(b"half an npz")
    assert collect_main([run.path]) == 0
    assert not os.path.exists(left) and os.path.exists(live)
    assert f"removed {left}, left by a killed run (process {pid})" in capsys.readouterr().err


def test_a_killed_idiff_data_leaves_a_folder_that_the_next_run_removes(tmp_path):
    out = tmp_path / "shapes"
    command = [sys.executable, "-m", "idiff.cli", "data", "synthetic", "--out", str(out), "--n", "100000",
               "--image-size", "8"]
    writer = subprocess.Popen(command, env=TEST_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith(".shapes.partial-") and os.listdir(tmp_path / n) for n in os.listdir(tmp_path)):
            assert time.monotonic() < deadline and writer.poll() is None, "idiff data never started writing"
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    [left] = [n for n in os.listdir(tmp_path) if n.startswith(".shapes.partial-")]
    assert f"-{writer.pid}-" in left

    result = idiff("data", "synthetic", "--out", out, "--n", "8", "--image-size", "8")
    assert sorted(os.listdir(tmp_path)) == ["shapes"] and len(os.listdir(out)) == 8
    assert f"removed {tmp_path / left}, left by a killed run" in result.stderr
