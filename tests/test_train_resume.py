"""Exact resume on 2 local ranks: an interrupted run ends bit for bit where an uninterrupted one does."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import assert_same_tensors, copy_run, final_files, idiff, start_idiff, tiny_spec, write_spec

# Processes, real training and Inception: minutes on 2 cores, so `make test-all` (and CI) runs them.
pytestmark = pytest.mark.slow

STEPS, SAVE = 40, 8


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
    """Run A: the same spec, straight through."""
    root = tmp_path_factory.mktemp("resume")
    spec = tiny_spec(shapes_dir, root / "A", max_steps=STEPS, save_interval=SAVE)
    idiff("train", write_spec(root / "A.yaml", spec), "--nproc", 2)
    return {"root": root, "spec": spec, "final": final_files(root / "A", STEPS)}


def spec_for(reference, name):
    spec = json.loads(json.dumps(reference["spec"]))
    spec["run_dir"] = str(reference["root"] / name)
    return write_spec(reference["root"] / f"{name}.yaml", spec), Path(spec["run_dir"])


def logged_step(run_dir: Path) -> int:
    log = run_dir / "log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for(condition, proc, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def finish_and_compare(reference, spec_path, run_dir):
    resumed = idiff("train", spec_path, "--nproc", 2)
    assert "start at step 0" not in resumed.stderr
    assert_same_tensors(final_files(run_dir, STEPS), reference["final"])
    return resumed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_signal_checkpoints_at_a_step_boundary_and_resume_is_exact(reference, sig):
    spec_path, run_dir = spec_for(reference, f"B-{sig.name}")
    proc = start_idiff("train", spec_path, "--nproc", 2)
    wait_for(lambda: logged_step(run_dir) >= 3, proc, what="step 3")
    proc.send_signal(sig)  # to the launcher: it forwards to both ranks
    time.sleep(0.05)
    proc.send_signal(sig)  # a second signal, likely during the save, must not corrupt anything
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    stopped_at = logged_step(run_dir)
    assert 3 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / f"checkpoint{stopped_at:06d}.json").exists()
    history = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    assert history[-1]["status"] == "preempted" and history[-1]["signal"] == sig.name
    resumed = finish_and_compare(reference, spec_path, run_dir)
    assert f"start at step {stopped_at}" in resumed.stderr


def test_sigkill_right_after_a_checkpoint(reference):
    spec_path, run_dir = spec_for(reference, "B-kill")
    proc = start_idiff("train", spec_path, "--nproc", 2)
    manifest = run_dir / "checkpoints" / f"checkpoint{2 * SAVE:06d}.json"
    wait_for(manifest.exists, proc, what="the second checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, as a lost node
    proc.wait(timeout=60)
    resumed = finish_and_compare(reference, spec_path, run_dir)
    assert "start at step 0" not in resumed.stderr


def test_sigkill_in_the_middle_of_a_checkpoint_write(reference):
    spec_path, run_dir = spec_for(reference, "B-midwrite")
    killed = idiff("train", spec_path, "--nproc", 2, check=False,
                   env={"IDIFF_TEST_KILL_DURING_SAVE": f"{3 * SAVE}:opt"})
    assert killed.returncode != 0
    folder = run_dir / "checkpoints"
    assert (folder / f"opt{3 * SAVE:06d}.pt").exists() and not (folder / f"checkpoint{3 * SAVE:06d}.json").exists()
    resumed = finish_and_compare(reference, spec_path, run_dir)
    assert f"start at step {2 * SAVE}" in resumed.stderr


def test_a_corrupt_checkpoint_is_skipped_with_a_warning_naming_it(reference):
    spec_path, run_dir = spec_for(reference, "B-corrupt")
    copy_run(reference["root"] / "A", run_dir)
    last = run_dir / "checkpoints" / f"opt{STEPS:06d}.pt"
    last.write_bytes(last.read_bytes()[:-100])  # a truncated file under an intact manifest
    resumed = finish_and_compare(reference, spec_path, run_dir)
    assert f"checkpoint{STEPS:06d}.json" in resumed.stderr and "does not match its manifest" in resumed.stderr
    assert f"start at step {STEPS - SAVE}" in resumed.stderr
