"""``idiff compare RUN_OR_METRICS...``: scores side by side with their protocols; differing protocols are marked.

Each argument is a ``metrics.json``, an evaluate run dir (its ``metrics.json``) or a training run dir (each row
of its ``evals.jsonl``). The first column is the baseline: a score in another column whose protocol differs
from the baseline's in a field of ``protocol.COMPARABILITY`` is marked ``!``, and the fields are named below
the table. Nothing is hidden: an incomparable score is still printed.
"""

import json
import sys

from .. import storage
from ..errors import UserError
from ..run_dir import RunDir
from ..train.checkpoint_evaluations import HEADLINES
from .protocol import COMPARABILITY, differences, field

SHOWN = (*COMPARABILITY, "seeds", "reference.kind", "reference.statistics", "torch_fidelity", "sampling.described",
         "sampling.noise_schedule", "sampling.diffusion_steps")
MARK = "!"


def columns_of(path: str) -> list[tuple[str, dict, dict | None]]:
    """(label, {score: value}, protocol) for each set of results ``path`` holds."""
    run = RunDir(path)
    if storage.isdir(path) and storage.exists(run.metrics_file):
        path = run.metrics_file
    elif storage.isdir(path) and storage.exists(run.evals_log):
        rows = storage.read_jsonl(run.evals_log, lambda r: isinstance(r.get("step"), int))
        return [(f"{path}@{row['step']}", row.get("metrics", {}), row.get("protocol")) for row in rows]
    if not storage.exists(path) or storage.isdir(path):
        raise UserError(f"{path}: neither a metrics.json nor a run dir holding metrics.json or evals.jsonl")
    try:
        results = json.loads(storage.read_text(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a metrics.json ({err})") from None
    if not isinstance(results, dict):
        raise UserError(f"{path}: not a metrics.json (no mapping of metrics)")
    scores = {}
    for metric, names in HEADLINES.items():
        result = results.get(metric) or {}
        for key, name in names.items():
            if isinstance(result.get(key), (int, float)):
                scores[name] = result[key]
            low = (result.get("seed_sets") or {}).get("min", {}).get(key)
            if low is not None:
                scores[f"{name} (min over seed sets)"] = low
    return [(path, scores, results.get("protocol"))]


def _shown(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def comparison(paths: list[str]) -> str:
    columns = [column for path in paths for column in columns_of(path)]
    if not columns:
        raise UserError("nothing to compare: the runs hold no results")
    base = columns[0][2]
    differ = [differences(base, protocol) for _, _, protocol in columns]
    score_names = list(dict.fromkeys(name for _, scores, _ in columns for name in scores))
    table = [["", *(f"[{i + 1}]" for i in range(len(columns)))]]
    for name in score_names:
        table.append([name, *(_shown(scores.get(name)) + (f" {MARK}" if d and name in scores else "")
                              for (_, scores, _), d in zip(columns, differ))])
    for name in SHOWN:
        values = [_shown(field(protocol, name)) for _, _, protocol in columns]
        decides = name in COMPARABILITY
        marker = "*" if decides else " "
        table.append([f"{marker} {name}", *values])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines += [f"[{i + 1}] {label}" for i, (label, _, _) in enumerate(columns)]
    lines.append("* decides comparability: " + ", ".join(COMPARABILITY))
    for i, d in enumerate(differ):
        if d:
            lines.append(f"{MARK} [{i + 1}] is not comparable with [1]: its protocol differs in {', '.join(d)}")
    if not any(differ):
        lines.append("all scores were obtained with the same protocol: comparable")
    return "\n".join(lines) + "\n"


def print_comparison(paths: list[str], out=None) -> int:
    (out or sys.stdout).write(comparison(paths))
    return 0
