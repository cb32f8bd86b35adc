"""train.tensorboard: TrainingLog's scalars and preview images land in event files that TensorBoard reads back."""

import importlib.util
import json

import numpy as np
import pytest
from conftest import tiny_spec

from idiff.errors import UserError
from idiff.jobspec.load import parse_spec
from idiff.run_dir import claim_run_dir
from idiff.train import training_log
from idiff.train.checkpoint_evaluations import record_evaluation
from idiff.train.training_log import TrainingLog, check_tensorboard

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_events(folder) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_logged_scalars_and_images_read_back_from_the_event_files(tmp_path):
    log = TrainingLog(tmp_path, tensorboard=True)
    rows = [{"step": step, "loss": 1 / step, "grad_norm": 0.5 * step, "lr": 1e-4} for step in range(1, 6)]
    for row in rows:
        log.write(row)
    log.add_scalars_at(5, {"fid": 12.5, "checkpoint": "model000005.pt"}, prefix="eval")
    grid = np.random.default_rng(0).integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    log.add_image("samples", grid, 5)
    log.flush()

    events = read_events(tmp_path / "tensorboard")
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/grad_norm", "train/lr", "eval/fid"}
    for key in ("loss", "grad_norm", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert logged == [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows]  # stored as float32
    assert [(e.step, e.value) for e in events.Scalars("eval/fid")] == [(5, 12.5)]
    (image,) = events.Images("samples")
    assert image.step == 5 and image.encoded_image_string[:4] == b"\x89PNG"
    log.close()


def test_a_spec_asking_for_tensorboard_without_it_installed_is_a_user_error(monkeypatch, tmp_path):
    spec = parse_spec({"kind": "train", "name": "tb", "run_dir": str(tmp_path / "run"),
                           "train": {"data_dir": str(tmp_path), "batch_size": 2, "max_steps": 1, "tensorboard": True}})
    check_tensorboard(spec)  # installed here: nothing to say
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(training_log.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.raises(UserError, match=r"train\.tensorboard .* pip install 'idiff\[tensorboard\]'") as err:
        check_tensorboard(spec)
    assert err.value.exit_code == 2
    with pytest.raises(UserError):
        TrainingLog(tmp_path, tensorboard=True)
    assert not (tmp_path / "tensorboard").exists()


def test_evaluations_during_training_are_scalars_of_the_run(tmp_path, shapes_dir):
    spec = tiny_spec(shapes_dir, tmp_path / "run")
    spec["train"]["tensorboard"] = True
    claim_run_dir(parse_spec(spec))
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "metrics.json").write_text(json.dumps({"fid": {"fid": 31.5}, "nll": {"bpd": 3.25}}))
    record_evaluation(tmp_path / "run", 8, tmp_path / "scores", None)
    events = read_events(tmp_path / "run" / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("eval/fid")] == [(8, 31.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/nll_bpd")] == [(8, 3.25)]
