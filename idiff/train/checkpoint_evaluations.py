"""Evaluation during training (``train.evaluate``): every ``every``-th checkpoint's weights are evaluated.

Each evaluation is an ordinary sample run (FID / IS / PR need images) and evaluate run inside the training
run dir, ``evals/<step>/samples`` and ``evals/<step>/evaluate``, reading the checkpoint through ``from_run``
with ``checkpoint: <step>``. Under Slurm (a job of idiff-submit) they are submitted as their own jobs on
``resources.evaluate``, so training never waits for them; elsewhere they run after the checkpoint, as
subprocesses of rank 0 (the other ranks wait at their next collective).

When an evaluation ends, its headline numbers are appended to ``evals.jsonl`` (step, metrics, job id) and
``metrics.png`` is drawn again. A step with a row, or whose jobs were submitted (``evals/<step>/submitted.json``),
is not evaluated again, after a requeue either. This module makes the specs and keeps the results; the hooks
and jobs that run them are in idiff.launch.hooks (and, on Slurm, idiff.launch.submit).
"""

import io
import json

from pydantic import with_config
from typing_extensions import TypedDict

from .. import storage
from ..jobspec.load import parse_spec
from ..run_dir import RunDir, utc_now
from .training_log import summary_writer

SUBMITTED = "submitted.json"  # in evals/<step>/: the Slurm jobs of that step's evaluation
# metric -> {number in its eval/<metric>.json: name in evals.jsonl and metrics.png}
HEADLINES = {"nll": {"bpd": "nll_bpd"}, "fid": {"fid": "fid"}, "sfid": {"sfid": "sfid"},
             "inception_score": {"mean": "inception_score"},
             "precision_recall": {"precision": "precision", "recall": "recall"}}


def evaluation_specs(train_spec, step: int) -> list:
    """The sample spec (when a metric needs images) and the evaluate spec of the evaluation of ``step``."""
    e = train_spec.train.evaluate
    folder = RunDir(train_spec.run_dir).evaluation(step)
    common = {"resources": train_spec.resources.for_evaluations().model_dump(mode="json")}
    specs, samples = [], None
    if e.needs_samples:
        samples = storage.join(folder, "samples")
        # Only what was set: a default written out (use_ddim: false) could contradict what was (sampler: ddim).
        section = e.sample_section(train_spec.run_dir, step).model_dump(mode="json", exclude_unset=True)
        specs.append(parse_spec({"kind": "sample", "name": f"{train_spec.name}-{step:06d}-samples", "run_dir": samples,
                                 "sample": section, **common}, source=f"train.evaluate of step {step}"))
    section = e.evaluate_section(train_spec.run_dir, step, samples).model_dump(mode="json")
    specs.append(parse_spec({"kind": "evaluate", "name": f"{train_spec.name}-{step:06d}-evaluate",
                             "run_dir": storage.join(folder, "evaluate"), "evaluate": section, **common},
                            source=f"train.evaluate of step {step}"))
    return specs


@with_config(storage.LOG_RECORD)
class EvaluationRow(TypedDict):
    """A row of evals.jsonl, as its readers (metrics.png, idiff status) use it; other keys are kept."""
    step: storage.Int64
    metrics: dict[str, float]


def evaluated_steps(run_dir) -> dict[int, dict]:
    """Step -> its evals.jsonl row; torn, garbage or wrongly typed lines are skipped with a warning."""
    rows = storage.read_jsonl(RunDir(run_dir).evals_log, storage.conforms(EvaluationRow))
    return {row["step"]: row for row in rows}


def record_evaluation(train_run_dir, step: int, evaluate_run_dir, job_id: str | None) -> dict:
    """Append the results of ``evaluate_run_dir`` (its metrics.json) as the row of ``step``, and redraw the plot."""
    results = json.loads(storage.read_text(RunDir(evaluate_run_dir).metrics_file))
    metrics = {name: results[metric][key] for metric, names in HEADLINES.items() if metric in results
               for key, name in names.items() if isinstance(results[metric].get(key), (int, float))}
    row = {"step": step, "metrics": metrics, "job_id": job_id, "time": utc_now(), "run_dir": str(evaluate_run_dir)}
    if "protocol" in results:  # how the fidelity scores were obtained (idiff.fidelity.protocol)
        row["protocol"] = results["protocol"]
    run = RunDir(train_run_dir)
    storage.append_text(run.evals_log, json.dumps(row) + "\n")
    plot_evaluations(sorted(evaluated_steps(run.path).values(), key=lambda r: r["step"]), run.evals_plot)
    train_spec = run.saved_job()
    if train_spec is not None and train_spec.train.tensorboard:  # beside the training's: TensorBoard reads them all
        board = summary_writer(run.tensorboard)
        for name, value in metrics.items():
            board.add_scalar(f"eval/{name}", value, step)
        board.close()
    return row


def plot_evaluations(rows: list[dict], path) -> None:
    """Each metric against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({name for row in rows for name in row["metrics"]})
    if not names:
        return
    fig, axes = plt.subplots(len(names), 1, figsize=(6, 2.5 * len(names)), dpi=100, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        points = [(row["step"], row["metrics"][name]) for row in rows if name in row["metrics"]]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.atomic_write_bytes(path, buffer.getvalue())
