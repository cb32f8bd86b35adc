"""A run dir is untrusted input, and disks fill up: manifests cannot make idiff read or delete other files, torn
log lines and bad manifests do not crash a resume or ``idiff status``, a full disk leaves the last complete
checkpoint and no half-written one, and a resumed run logs each step once."""

import contextlib
import csv
import json
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors, final_files, idiff, load, require_service, tiny_spec, write_spec

from idiff.checkpoints import BackgroundWriter, CheckpointStore, checkpoint_files
from idiff.cli import main
from idiff.errors import RunFailed

SAVE, STEPS = 4, 8


def payloads(step, opt_floats=16) -> dict:
    files = checkpoint_files(step, [0.9])
    return {files["model"]: {"w": torch.full((16,), float(step))}, files["opt"]: {"m": torch.zeros(opt_floats)},
            files["state"]: {"step": step}, files["ema_0.9"]: {"w": torch.zeros(16)}}


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------- manifests


def test_pruning_deletes_only_the_files_it_names_from_step_numbers(tmp_path):
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    for step in (2, 4, 6):
        store.write(step, payloads(step), {})
    victims = [tmp_path / "victim.txt", tmp_path / "run" / "spec.yaml"]
    for victim in victims:
        victim.write_text("not idiff's to delete")
    manifest = json.loads(Path(store.manifest_path(2)).read_text())
    manifest["files"].update({"../spec.yaml": {}, str(victims[0]): {}})
    Path(store.manifest_path(2)).write_text(json.dumps(manifest))

    with pytest.warns(UserWarning, match="checkpoint000002.json: not a usable checkpoint"):
        assert store.prune(keep_last=1, keep_every=None) == [4]  # 2 is unusable: pruning neither counts nor reads it
    assert all(victim.read_text() == "not idiff's to delete" for victim in victims)
    assert listing(store.folder) == sorted([*checkpoint_files(2, [0.9]).values(), "checkpoint000002.json",
                                            *checkpoint_files(6, [0.9]).values(), "checkpoint000006.json"])


def test_a_manifest_naming_a_file_outside_its_folder_makes_the_checkpoint_unusable(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.write(4, payloads(4), {})
    store.write(8, payloads(8), {})
    outside = tmp_path / "secret.pt"
    shutil.copy(store.path("model000008.pt"), outside)
    manifest = json.loads(Path(store.manifest_path(8)).read_text())
    manifest["files"][str(outside)] = manifest["files"]["model000008.pt"]  # a digest that matches
    Path(store.manifest_path(8)).write_text(json.dumps(manifest))
    assert f"names {str(outside)!r}, which is not a file of checkpoint 8" in store.problem(8)
    with pytest.warns(UserWarning, match="skipping checkpoint .*checkpoint000008.json"):
        assert store.latest_complete() == 4


BAD_MANIFESTS = {"truncated": '{"step": 8, "fi', "a list": "[1, 2]", "files not a mapping": '{"step": 8, "files": 3}',
                 "another step": '{"step": 4, "files": {}}', "empty": ""}


@pytest.mark.parametrize("case", BAD_MANIFESTS)
def test_a_bad_manifest_only_makes_its_checkpoint_unusable(tmp_path, case):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.write(4, payloads(4), {})
    store.write(8, payloads(8), {})
    Path(store.manifest_path(8)).write_text(BAD_MANIFESTS[case])
    assert store.problem(8)
    with pytest.warns(UserWarning, match="checkpoint000008.json"):
        assert store.latest_complete() == 4
    assert store.prune(keep_last=1, keep_every=None) == []  # the unusable one does not count as the newest
    assert "model000004.pt" in listing(store.folder)


@pytest.mark.parametrize("stray", ["checkpoint999999.json", "checkpoint\u0669\u0669\u0669\u0669\u0669\u0669.json",
                                   "checkpoint0000010.json"])
def test_pruning_counts_only_verified_checkpoints_never_a_strays_name(tmp_path, stray):
    """A partial copy's unusable manifest, one named with non-ASCII digits, or with a step's digits padded other
    than idiff pads them, is ignored with a warning: keep_last keeps the real newest checkpoints."""
    store = CheckpointStore(tmp_path / "checkpoints")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / stray).write_text('{"step": 999999, "fi')
    with pytest.warns(UserWarning, match=f"ignoring .*{stray}"):
        for step in (2, 4, 6):
            store.write(step, payloads(step), {})
            store.prune(keep_last=2, keep_every=None)
    assert listing(store.folder) == sorted([*checkpoint_files(4, [0.9]).values(), "checkpoint000004.json",
                                            *checkpoint_files(6, [0.9]).values(), "checkpoint000006.json", stray])
    fresh = CheckpointStore(store.folder)  # a resumed process hashes what it did not write
    with pytest.warns(UserWarning, match=f"ignoring .*{stray}"):
        assert fresh.verified_steps() == [4, 6]
    Path(store.path("model000006.pt")).write_bytes(b"torn")
    with pytest.warns(UserWarning, match="checkpoint000006.json: not a usable checkpoint"):
        assert fresh.prune(keep_last=1, keep_every=None) == []  # 6 no longer counts: 4 is the newest complete one


# ------------------------------------------------------------------------------------------- full disks


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG for this process, as on a full or over-quota disk."""
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel's SIGXFSZ kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_background_write_removes_its_files_and_keeps_the_last_complete_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.write(4, payloads(4), {})
    before = listing(store.folder)
    writer = BackgroundWriter(store)
    with file_size_limit(1 << 20):
        writer.submit(8, payloads(8, opt_floats=1 << 20), {})  # the model fits, the 4 MiB optimizer file does not
        with pytest.raises(RunFailed) as failure:
            writer.wait()
    message = str(failure.value)
    assert f"could not write checkpoint 8 to {store.folder}" in message and "MiB free" in message
    assert "checkpoint 4 is the newest complete one" in message
    assert listing(store.folder) == before  # model000008.pt removed again, no temporary file
    assert store.latest_complete() == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB file system: room for one checkpoint of the tiny model (15 MiB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True,
                            text=True, check=False)
    require_service(None if result.returncode == 0 else
                    f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}; "
                    f"test_a_failed_background_write_... covers the cleanup in-process")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_exits_1_naming_the_folder_and_keeps_the_last_complete_checkpoint(shapes_dir, small_disk):
    run_dir = small_disk / "run"
    spec = tiny_spec(shapes_dir, run_dir, max_steps=4, save_interval=2, num_workers=0)
    result = idiff("train", write_spec(small_disk.parent / "job.yaml", spec), check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"could not write checkpoint 4 to {run_dir / 'checkpoints'} (No space left on device" in result.stderr
    assert "MiB free" in result.stderr and "checkpoint 2 is the newest complete one" in result.stderr
    store = CheckpointStore(run_dir / "checkpoints")
    assert store.latest_complete() == 2
    assert listing(store.folder) == sorted([*checkpoint_files(2, [0.9, 0.99]).values(), "checkpoint000002.json"])


# ------------------------------------------------------------------------------------------- logs


@pytest.fixture(scope="module")
def finished_run(shapes_dir, tmp_path_factory):
    """A run of 8 steps, checkpoints at 4 and 8, a log row per step."""
    root = tmp_path_factory.mktemp("logs")
    spec = tiny_spec(shapes_dir, root / "run", max_steps=STEPS, save_interval=SAVE, num_workers=0)
    idiff("train", write_spec(root / "run.yaml", spec))
    return root / "run", spec


def copied(finished_run, tmp_path):
    source, spec = finished_run
    run_dir = shutil.copytree(source, tmp_path / "run")
    return run_dir, write_spec(tmp_path / "run.yaml", {**spec, "run_dir": str(run_dir)})


def logged_steps(run_dir) -> tuple[list, list]:
    jsonl = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()
             if line.startswith("{")]
    with open(run_dir / "progress.csv") as f:
        rows = [int(row["step"]) for row in csv.DictReader(f)]
    return jsonl, rows


@pytest.mark.slow
def test_a_run_preempted_after_logging_past_its_checkpoint_logs_each_step_once(finished_run, tmp_path):
    run_dir, spec_path = copied(finished_run, tmp_path)
    (run_dir / "checkpoints" / "checkpoint000008.json").unlink()  # as if stopped before checkpoint 8 counted
    with open(run_dir / "log.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a line torn by the crash
    resumed = idiff("train", spec_path)
    assert f"start at step {SAVE}" in resumed.stderr
    assert logged_steps(run_dir) == (list(range(1, STEPS + 1)), list(range(1, STEPS + 1)))


@pytest.mark.slow
def test_garbage_lines_and_a_bad_manifest_do_not_crash_status_or_a_resume(finished_run, tmp_path, capsys):
    run_dir, spec_path = copied(finished_run, tmp_path)
    for name in ("log.jsonl", "jobs.jsonl"):
        lines = (run_dir / name).read_text().splitlines(keepends=True)
        (run_dir / name).write_text("".join([lines[0], "\x00garbage{\n", "[1, 2]\n", *lines[1:]]))
    (run_dir / "checkpoints" / "checkpoint000008.json").write_text('{"step": 8, "files": ')
    with pytest.warns(UserWarning) as warned:
        assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"last complete checkpoint: step {SAVE}" in out and "incomplete or corrupt checkpoints: 8" in out
    assert f"last log: step {STEPS}" in out and "status=completed" in out
    messages = [str(w.message) for w in warned]
    assert f"{run_dir / 'log.jsonl'}: skipped 2 unreadable line(s)" in messages
    assert f"{run_dir / 'jobs.jsonl'}: skipped 2 unreadable line(s)" in messages

    resumed = idiff("train", spec_path)
    assert f"start at step {SAVE}" in resumed.stderr and "Traceback" not in resumed.stderr
    assert resumed.stderr.count("skipped 2 unreadable line(s)") == 1  # warned once, not at every save
    assert logged_steps(run_dir) == (list(range(1, STEPS + 1)), list(range(1, STEPS + 1)))


@pytest.mark.slow
def test_a_checkpoint_of_an_earlier_version_holding_rng_states_still_resumes_exactly(finished_run, tmp_path):
    """Earlier versions saved every rank's torch, numpy and python RNG states in state{S}.pt; they are ignored
    now (dropout is reseeded from the step), and the run still ends as an uninterrupted one."""
    run_dir, spec_path = copied(finished_run, tmp_path)
    store = CheckpointStore(run_dir / "checkpoints")
    (run_dir / "checkpoints" / "checkpoint000008.json").unlink()
    files = checkpoint_files(SAVE, [0.9, 0.99])
    payloads = {name: load(store.path(name)) for name in files.values()}
    payloads[files["state"]]["rng"] = [{"torch": torch.get_rng_state(),
                                        "numpy": {"key": torch.zeros(624, dtype=torch.int64), "pos": 624},
                                        "python": {"version": 3, "internal": [0] * 625, "gauss": None}}]
    manifest = store.manifest(SAVE)
    store.write(SAVE, payloads, {k: v for k, v in manifest.items() if k not in ("step", "files")})
    resumed = idiff("train", spec_path)
    assert f"start at step {SAVE}" in resumed.stderr
    assert_same_tensors(final_files(run_dir, STEPS), final_files(finished_run[0], STEPS))
