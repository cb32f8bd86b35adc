"""Bad input never reaches the user as a traceback, and is refused before the run dir is written.

Specs, ``--set`` values and checkpoints are untrusted: each case below exits 2 (or 130 for Ctrl-C)
with one message naming the file or field, prints nothing unbounded, and creates no run dir.
"""

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, copy_run, start_idiff, tiny_spec, write_spec
from conftest import idiff as run_idiff

from idiff import create_model_and_diffusion
from idiff.cli import main as idiff_main
from idiff.train.loop import learning_rate

MAX_MESSAGE = 2000  # characters: every message here is a few lines at most


def refused(capsys, argv, messages, code=2, run_dir=None) -> str:
    """``idiff ARGV`` in this process exits ``code`` with ``messages``, briefly, without a traceback and
    without creating ``run_dir``; returns what it printed."""
    assert idiff_main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    for message in messages:
        assert message in err, err[:MAX_MESSAGE]
    assert "Traceback" not in err and len(err) < MAX_MESSAGE, err[:MAX_MESSAGE]
    assert run_dir is None or not Path(run_dir).exists()
    return err


@pytest.fixture
def good(shapes_dir, tmp_path):
    return tiny_spec(shapes_dir, tmp_path / "run")


def sample_spec(tmp_path, **sample) -> dict:
    return {"kind": "sample", "name": "s", "run_dir": str(tmp_path / "run"), "model": dict(TINY_MODEL),
            "diffusion": {"diffusion_steps": 50}, "sample": {"model_path": str(tmp_path / "model.pt"), **sample}}


# ------------------------------------------------------------------------- what the spec alone decides
TRAIN_CASES = {  # name: (section, values, message)
    "num_channels not a multiple of GroupNorm's 32": (
        "model", {"num_channels": 48}, "model.num_channels: must be a multiple of 32"),
    "num_heads not dividing the attention channels": (
        "model", {"num_heads": 3}, "num_heads (3) does not divide the 64 channels (num_channels x 2)"),
    "num_heads_upsample not dividing them": (
        "model", {"num_heads_upsample": 5}, "num_heads_upsample (5) does not divide the 64 channels"),
    "the middle block's heads": (
        "model", {"attention_resolutions": "", "num_heads": 48}, "num_heads (48) does not divide the 64 channels"),
    "image_size without a default channel_mult": (
        "model", {"image_size": 24, "channel_mult": ""}, "image_size 24 has no default channel multipliers"),
    "channel_mult too deep for the size": (
        "model", {"channel_mult": "1,2,2,2,2,2"}, "the size (16 px) must be a multiple of 32"),
    "one diffusion step": ("diffusion", {"diffusion_steps": 1}, "diffusion.diffusion_steps: Input should be greater"),
    "a linear schedule too short for its betas": (
        "diffusion", {"diffusion_steps": 10, "noise_schedule": "linear"}, "betas up to 2"),
    "respacing ddimx": ("diffusion", {"timestep_respacing": "ddimx"}, "timestep_respacing: 'ddimx' is not a respacing"),
    "respacing ddim0": ("diffusion", {"timestep_respacing": "ddim0"}, "timestep_respacing: 'ddim0' is not a respacing"),
    "respacing 10,x": ("diffusion", {"timestep_respacing": "10,x"}, "timestep_respacing: '10,x' is not a respacing"),
    "respacing -5": ("diffusion", {"timestep_respacing": "-5"}, "timestep_respacing: '-5' is not a respacing"),
    "respacing beyond diffusion_steps": (
        "diffusion", {"timestep_respacing": "60"}, "cannot keep 60 steps out of a section of 50"),
    "lr inf": ("train", {"lr": float("inf")}, "train.lr: Input should be a finite number"),
    "lr nan": ("train", {"lr": float("nan")}, "train.lr: Input should be a finite number"),
    "lr_anneal_steps shorter than max_steps": (
        "train", {"lr_anneal_steps": 5}, "lr_anneal_steps (5) is shorter than the run (12 steps)"),
    "lr_anneal_steps shorter than max_images": (
        "train", {"lr_anneal_steps": 4, "max_steps": None, "max_images": 40}, "shorter than the run (5 steps)"),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_what_the_spec_decides_is_refused_by_validate_and_before_the_run_dir(capsys, tmp_path, good, case):
    section, values, message = TRAIN_CASES[case]
    good[section].update(values)
    path = write_spec(tmp_path / "bad.yaml", good)
    refused(capsys, ["validate", path], [message])
    refused(capsys, ["train", path], [message], run_dir=good["run_dir"])


@pytest.mark.parametrize("respacing,message", [
    ("ddimx", "sample.timestep_respacing: 'ddimx' is not a respacing"),
    ("10,x", "sample.timestep_respacing: '10,x' is not a respacing"),
    ("-5", "sample.timestep_respacing: '-5' is not a respacing"),
    ("ddim60", "sample.timestep_respacing: cannot take exactly 60 evenly strided steps out of 50"),
])
def test_sample_respacing_is_checked_against_the_models_steps(capsys, tmp_path, respacing, message):
    path = write_spec(tmp_path / "s.yaml", sample_spec(tmp_path, timestep_respacing=respacing))
    refused(capsys, ["validate", path], [message])
    refused(capsys, ["sample", path], [message], run_dir=tmp_path / "run")


def test_sample_respacing_against_a_training_runs_steps(capsys, trained):
    spec = {"kind": "sample", "name": "s", "run_dir": str(trained["root"] / "respaced"),
            "sample": {"from_run": str(trained["run"]), "timestep_respacing": "80"}}
    path = write_spec(trained["root"] / "respaced.yaml", spec)
    refused(capsys, ["sample", path], ["sample.timestep_respacing: cannot keep 80 steps out of a section of 50"],
            run_dir=spec["run_dir"])


def test_the_learning_rate_is_held_at_zero_after_the_anneal():
    assert [learning_rate(1e-3, 4, step) for step in (0, 2, 4, 6)] == [1e-3, 5e-4, 0.0, 0.0]
    assert learning_rate(1e-3, 0, 10**6) == 1e-3


# ------------------------------------------------------------------------- spec files and --set values
def alias_bomb(levels=7) -> str:
    """A YAML mapping of ``levels`` lists of nine aliases of the one before: 9**levels (4.8 million)
    strings once expanded, 400 bytes as text."""
    lists = ['b0: &b0 [' + ", ".join(['"xxxxxxxxxx"'] * 9) + ']']
    lists += [f"b{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "{" + ", ".join(lists) + "}"


SPEC_FILES = {  # name: (how to write the file at path, message)
    "binary": (lambda p: p.write_bytes(b"\xff\xfe\x00\x01kind: train\n"), "not a text file (byte 0 is not UTF-8)"),
    "a folder": (lambda p: p.mkdir(), "a folder, not a spec file"),
    "too deep": (lambda p: p.write_text("kind: train\nname: x\nmodel: " + "[" * 5000 + "]" * 5000),
                 "nested more than 20 levels deep"),
    "too large": (lambda p: p.write_text("kind: train\n" + "#" * (2 << 20)), "larger than 1024 KiB"),
    "an alias bomb in a value": (lambda p: p.write_text(f"kind: train\nname: x\ntrain:\n  lr: {alias_bomb()}\n"),
                                 "expands to more than 100,000 values (through aliases)"),
    "a recursive alias": (lambda p: p.write_text("kind: train\nname: x\ntrain: &t {lr: *t}\n"),
                          "a job spec cannot be recursive"),
    "a huge offending value": (lambda p: p.write_text(f"kind: train\nname: x\ntrain: {{lr: {'9' * 100000}x}}\n"),
                               "train.lr: Input should be a valid number"),
}


@pytest.mark.parametrize("case", SPEC_FILES)
def test_a_spec_file_that_is_not_a_small_yaml_mapping(capsys, tmp_path, case):
    write, message = SPEC_FILES[case]
    path = tmp_path / "spec.yaml"
    write(path)
    err = refused(capsys, ["validate", path], [str(path), message])
    refused(capsys, ["train", path], [message])
    assert "xxxxxxxxxx" not in err


@contextlib.contextmanager
def as_another_user():
    """Run the body as a user that owns nothing here: root reads and writes everything."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)  # nobody
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def shared_folder():
    """A folder another user can enter (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    folder.chmod(0o755)
    shutil.rmtree(folder)


def test_an_unreadable_spec(capsys, shared_folder, good):
    path = Path(write_spec(shared_folder / "spec.yaml", good))
    path.chmod(0)
    with as_another_user():
        refused(capsys, ["validate", path], [f"{path}: cannot read the spec (Permission denied)"])


@pytest.mark.parametrize("override,message", [
    ("train.lr=[1,", "--set 'train.lr=[1,':1:4: not valid YAML"),
    ("train.lr=" + alias_bomb(), "expands to more than 100,000 values"),
    ("train.lr=" + "[" * 1000 + "]" * 1000, "nested more than 20 levels deep"),
    ("train.lr=" + "1" * 100000 + "x", "train.lr: Input should be a valid number"),
])
def test_set_values_that_are_not_small_yaml(capsys, tmp_path, good, override, message):
    path = write_spec(tmp_path / "good.yaml", good)
    refused(capsys, ["validate", path, "--set", override], [message])
    refused(capsys, ["train", path, "--set", override], [message], run_dir=good["run_dir"])


def test_many_errors_are_listed_up_to_a_limit(capsys, tmp_path):
    path = write_spec(tmp_path / "s.yaml", sample_spec(tmp_path, class_labels=["x"] * 5000))
    refused(capsys, ["validate", path], ["sample.class_labels", "more"])


# ------------------------------------------------------------------------- checkpoints and run dirs
class Payload:
    """A pickle that runs a command when it is unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious(path):
    torch.save({"weight": Payload(Path(path).parent / "pwned")}, path)


def truncated(path):
    torch.save({"weight": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:200])


CHECKPOINTS = {  # name: (write a bad checkpoint at path, message)
    "a malicious pickle": (malicious, "holds pickled objects besides tensors, which idiff refuses"),
    "a truncated checkpoint": (truncated, "cannot be loaded as a checkpoint: it is truncated, corrupt"),
    "a text file": (lambda p: p.write_text("not a checkpoint"), "cannot be loaded as a checkpoint"),
    "empty": (lambda p: p.write_bytes(b""), "cannot be loaded as a checkpoint"),
    "tensors, but no state dict": (lambda p: torch.save([torch.zeros(1)], p), "holds a list, not a plain state dict"),
}


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_a_bad_model_path(capsys, tmp_path, case):
    write, message = CHECKPOINTS[case]
    write(tmp_path / "model.pt")
    path = write_spec(tmp_path / "s.yaml", sample_spec(tmp_path))
    refused(capsys, ["sample", path], [f"sample.model_path: {tmp_path / 'model.pt'}", message],
            run_dir=tmp_path / "run")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", CHECKPOINTS)
def test_a_bad_resume_checkpoint(capsys, tmp_path, good, case):
    write, message = CHECKPOINTS[case]
    write(tmp_path / "model000010.pt")
    good["train"]["resume_checkpoint"] = str(tmp_path / "model000010.pt")
    path = write_spec(tmp_path / "t.yaml", good)
    refused(capsys, ["train", path], ["train.resume_checkpoint:", message], run_dir=good["run_dir"])
    assert not (tmp_path / "pwned").exists()


def test_a_resume_checkpoint_of_another_architecture(capsys, tmp_path, good):
    other = dict(TINY_MODEL, num_channels=64)
    torch.save(create_model_and_diffusion(**other)[0].state_dict(), tmp_path / "other.pt")
    good["train"]["resume_checkpoint"] = str(tmp_path / "other.pt")
    path = write_spec(tmp_path / "t.yaml", good)
    refused(capsys, ["train", path], ["train.resume_checkpoint:", "flags that probably differ: num_channels"],
            run_dir=good["run_dir"])


def from_run_copy(trained, tmp_path, spoil):
    run = copy_run(trained["run"], tmp_path / "copied-run")
    spoil(run)
    spec = {"kind": "sample", "name": "s", "run_dir": str(tmp_path / "out"),
            "sample": {"from_run": str(run), "num_samples": 2, "batch_size": 2, "use_ddim": True,
                       "timestep_respacing": "ddim5"}}
    return write_spec(tmp_path / "s.yaml", spec), run


@pytest.mark.parametrize("spoil,message", [
    (lambda run: (run / "spec.yaml").write_bytes(b"kind: train\n\xff\xfe"), "spec.yaml"),
    (lambda run: (run / "spec.yaml").write_text("kind: train\nname: [unclosed\n"), "spec.yaml"),
    (lambda run: (run / "spec.yaml").write_text("- a list\n"), "spec.yaml"),
    (lambda run: (run / "classes.json").write_text("[\"circle\", "), "classes.json is not readable JSON"),
    (lambda run: (run / "classes.json").write_bytes(b"\xff\xfe"), "classes.json is not readable JSON"),
    (lambda run: (run / "classes.json").write_text("{\"circle\": 0}"), "classes.json is not a list of class names"),
], ids=["spec binary", "spec not yaml", "spec not a mapping", "classes truncated", "classes binary",
        "classes not a list"])
def test_a_corrupt_from_run(capsys, trained, tmp_path, spoil, message):
    path, _ = from_run_copy(trained, tmp_path, spoil)
    refused(capsys, ["sample", path], [message], run_dir=tmp_path / "out")


def test_a_run_dir_that_is_a_file(capsys, tmp_path, good):
    Path(good["run_dir"]).write_text("the user's notes")
    path = write_spec(tmp_path / "t.yaml", good)
    refused(capsys, ["train", path], [f"run_dir {good['run_dir']} is a file, not a folder"])
    good["run_dir"] = str(Path(good["run_dir"]) / "run")
    refused(capsys, ["train", write_spec(tmp_path / "t.yaml", good), "--nproc", 2],
            [f"cannot be created: {tmp_path / 'run'} is a file"])
    assert Path(tmp_path / "run").read_text() == "the user's notes"


def test_a_read_only_run_dir(capsys, shared_folder, good):
    good["run_dir"] = str(shared_folder / "run")
    good["train"]["data_dir"] = "/nowhere"  # the run dir is refused first, whatever else is wrong
    path = write_spec(shared_folder / "t.yaml", good)
    if os.geteuid() != 0:
        shared_folder.chmod(0o555)
    with as_another_user():
        message = f"run_dir: {shared_folder / 'run'} cannot be written: {shared_folder} is read-only"
        refused(capsys, ["train", path], [message])
    assert [p.name for p in shared_folder.iterdir()] == ["t.yaml"]


def test_mpiexec_without_mpi4py_names_the_extra(capsys, monkeypatch, tmp_path, good):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # what an environment without the extra looks like
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    path = write_spec(tmp_path / "t.yaml", good)
    refused(capsys, ["train", path], ["needs mpi4py: pip install 'idiff[mpi]'"], run_dir=good["run_dir"])


# ------------------------------------------------------------------------- interrupts and pipes
def test_ctrl_c_outside_a_run_exits_130_in_one_line(capsys, tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)  # reading it waits for a writer: the user presses Ctrl-C meanwhile
    # Python's own handler, as in a terminal: a test run started in the background inherits SIGINT ignored.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert idiff_main(["validate", str(fifo)]) == 130
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err == "idiff: interrupted\n"


def test_status_into_a_pipe_that_closes_early(trained, tmp_path):
    run = copy_run(trained["run"], tmp_path / "long-history")
    with open(run / "jobs.jsonl", "a") as history:  # a long-lived run: far more output than a pipe holds
        history.writelines(['{"event": "start", "time": "2026-01-01T00:00:00+00:00", "launcher": "slurm"}\n'] * 3000)
    proc = start_idiff("status", run)
    assert proc.stdout.readline().startswith("run tiny")
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert err == "", err


def test_idiff_debug_restores_the_traceback(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xff")
    result = run_idiff("train", path, check=False, env={"IDIFF_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr and "SpecError" in result.stderr
