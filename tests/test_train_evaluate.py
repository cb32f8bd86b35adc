"""train.evaluate: checkpoints evaluated during training (locally here, after the checkpoint; under Slurm as jobs
of their own: tests/test_cluster.py), one evals.jsonl row per evaluated step, metrics.png, no second evaluation
of a step; and the spec's bad values refused with exit 2."""

import json
from pathlib import Path

import pytest
from conftest import tiny_spec, write_spec

from idiff.cli import main as idiff_main
from idiff.jobspec.load import parse_spec
from idiff.launch.hooks import EvaluatingHooks
from idiff.ranks.env import RankEnv
from idiff.train.checkpoint_evaluations import evaluated_steps, evaluation_specs, record_evaluation

NLL = {"metrics": ["nll"], "num_samples": 2, "batch_size": 2}


def spec_with(tmp_path, shapes_dir, section, **resources) -> dict:
    """The tiny spec with ``section`` as train.evaluate."""
    spec = tiny_spec(shapes_dir, tmp_path / "run", max_steps=4, save_interval=2, num_workers=0)
    spec["train"]["evaluate"] = section
    if resources:
        spec["resources"] = resources
    return spec


@pytest.mark.parametrize("evaluate, message", [
    ({"every": 3, **NLL, "data_dir": "d"}, "evaluate.every (3) must be a multiple of save_interval (2)"),
    ({"every": 2, "metrics": ["fid"]}, "fid needs reference"),
    ({"every": 2, **NLL}, "nll needs data_dir"),
    ({"every": 2, "metrics": ["fid"], "reference": "x", "sample": {"from_run": "y"}}, "sample: from_run is not set"),
])
def test_bad_evaluate_sections_are_exit_2(capsys, tmp_path, shapes_dir, evaluate, message):
    path = write_spec(tmp_path / "t.yaml", spec_with(tmp_path, shapes_dir, evaluate))
    assert idiff_main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_metrics_take_the_comma_form_of_the_evaluate_section(tmp_path, shapes_dir):
    spec = spec_with(tmp_path, shapes_dir, {"every": 2, "metrics": "nll, fid", "reference": "r", "data_dir": "d"})
    assert parse_spec(spec).train.evaluate.metrics == ["nll", "fid"]


def test_local_run_evaluates_every_nth_checkpoint_once(capsys, tmp_path, shapes_dir):
    spec = spec_with(tmp_path, shapes_dir, {"every": 2, **NLL, "data_dir": shapes_dir})
    assert idiff_main(["train", write_spec(tmp_path / "t.yaml", spec)]) == 0
    run = Path(spec["run_dir"])
    rows = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["job_id"] is None for r in rows)
    for row in rows:
        results = json.loads((run / "evals" / f"{row['step']:06d}" / "evaluate" / "metrics.json").read_text())
        assert row["metrics"] == {"nll_bpd": results["nll"]["bpd"]}
    assert (run / "metrics.png").stat().st_size > 0
    # A requeued run that writes checkpoint 4 again does not evaluate it again.
    parsed = parse_spec(spec, source="test")
    EvaluatingHooks(parsed, RankEnv()).checkpoint_written(4)
    assert "step 4 was evaluated before" in capsys.readouterr().err
    assert len((run / "evals.jsonl").read_text().splitlines()) == 2


def test_fid_draws_images_from_the_checkpoint_first(tmp_path, shapes_dir):
    evaluate = {"every": 2, "metrics": ["fid", "nll"], "reference": shapes_dir, "data_dir": shapes_dir,
                "use_ema": 0.99, "sample": {"num_samples": 16, "batch_size": 8, "sampler": "ddim", "steps": 5}}
    spec = parse_spec(spec_with(tmp_path, shapes_dir, evaluate, nodes=4, partition="gpu"), source="test")
    sample, scores = evaluation_specs(spec, 6)
    assert sample.kind == "sample" and scores.kind == "evaluate"
    s = sample.sample
    assert (s.from_run, s.checkpoint, s.use_ema, s.num_samples, s.sampler_name, s.steps) == \
        (spec.run_dir, 6, 0.99, 16, "ddim", 5)
    assert scores.evaluate.samples == sample.run_dir == f"{spec.run_dir}/evals/000006/samples"
    assert (scores.evaluate.from_run, scores.evaluate.checkpoint) == (spec.run_dir, 6)
    # resources.evaluate unset: the training's resources on one node
    assert (sample.resources.nodes, sample.resources.partition) == (1, "gpu")
    spec = parse_spec(spec_with(tmp_path, shapes_dir, evaluate, nodes=4, evaluate={"nodes": 2, "timeout_min": 30}),
                      source="test")
    assert [(j.resources.nodes, j.resources.timeout_min) for j in evaluation_specs(spec, 6)] == [(2, 30), (2, 30)]


def test_rows_hold_each_metrics_headline_and_the_plot_has_a_panel_each(tmp_path):
    train, scores = tmp_path / "train", tmp_path / "scores"
    train.mkdir()
    scores.mkdir()
    for step, fid in ((10, 40.0), (20, 30.0)):
        (scores / "metrics.json").write_text(json.dumps({
            "fid": {"fid": fid, "num_samples": 10}, "nll": {"bpd": 3.5, "num_images": 4},
            "precision_recall": {"precision": 0.5, "recall": 0.25, "f_score": None}}))
        record_evaluation(train, step, scores, "77")
    rows = evaluated_steps(train)
    assert rows[20]["metrics"] == {"fid": 30.0, "nll_bpd": 3.5, "precision": 0.5, "recall": 0.25}
    assert rows[10]["job_id"] == "77"
    from PIL import Image

    assert Image.open(train / "metrics.png").size[1] > Image.open(train / "metrics.png").size[0]  # 4 panels
