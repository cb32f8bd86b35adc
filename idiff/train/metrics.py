"""Training metrics: accumulated on the device without host syncs, reduced over ranks once per log row."""

import csv
import io
import json

import torch
import torch.distributed as dist

from .. import storage

QUARTILES = 4
KEYS = ("loss", "mse", "vb")


class StepStats:
    """Sums of each loss term, overall and per timestep quartile (as the original logs ``loss_q0``...)."""

    def __init__(self, num_timesteps: int, device):
        self.num_timesteps = num_timesteps
        self.device = device
        # rows: keys; columns: [all, q0..q3] sums, then [all, q0..q3] counts
        self.sums = torch.zeros(len(KEYS), 1 + QUARTILES, dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(KEYS), 1 + QUARTILES, dtype=torch.float64, device=device)
        self.extra = torch.zeros(2, dtype=torch.float64, device=device)  # grad norm sum, steps

    @torch.no_grad()
    def add_losses(self, t, losses: dict, weights) -> None:
        quartile = (QUARTILES * t // self.num_timesteps).clamp(max=QUARTILES - 1) + 1
        for row, key in enumerate(KEYS):
            if key not in losses:
                continue
            values = (losses[key].detach() * (weights if key == "loss" else 1)).double()
            self.sums[row, 0] += values.sum()
            self.counts[row, 0] += values.numel()
            self.sums[row].index_add_(0, quartile, values)
            self.counts[row].index_add_(0, quartile, torch.ones_like(values))

    @torch.no_grad()
    def add_grad_norm(self, grad_norm, finite) -> None:
        self.extra[0] += torch.where(finite, grad_norm.detach(), 0).double()
        self.extra[1] += finite.double()

    def reduce(self) -> dict:
        """Means over every rank since the last call (a collective: call on all ranks)."""
        packed = torch.cat([self.sums.flatten(), self.counts.flatten(), self.extra])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        values = packed.tolist()
        n = self.sums.numel()
        sums, counts, extra = values[:n], values[n:2 * n], values[2 * n:]
        row = {}
        for i, key in enumerate(KEYS):
            for j, suffix in enumerate(["", *[f"_q{q}" for q in range(QUARTILES)]]):
                k = i * (1 + QUARTILES) + j
                if counts[k]:
                    row[key + suffix] = sums[k] / counts[k]
        if extra[1]:
            row["grad_norm"] = extra[0] / extra[1]
        self.sums.zero_()
        self.counts.zero_()
        self.extra.zero_()
        return row


class MetricsLog:
    """``log.jsonl`` (every key) and ``progress.csv`` (columns fixed by the first row), appended across resumes.

    A resumed run first drops the rows of the steps after its checkpoint (``drop_after``): it logs them again.
    """

    def __init__(self, run_dir):
        self.jsonl = storage.join(run_dir, "log.jsonl")
        self.csv = storage.join(run_dir, "progress.csv")
        self._columns = None  # progress.csv's header, read once

    def write(self, row: dict) -> None:
        storage.append_text(self.jsonl, json.dumps(row) + "\n")
        if self._columns is None:
            self._columns = self._csv_header()
        new = not self._columns
        if new:
            self._columns = list(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
        storage.append_text(self.csv, buffer.getvalue())

    def _csv_header(self) -> list[str]:
        if not storage.exists(self.csv):
            return []
        return next(csv.reader([storage.read_first_line(self.csv)]), [])

    def rows(self) -> list[dict]:
        """The rows of log.jsonl; torn or garbage lines are skipped with a warning."""
        return storage.read_jsonl(self.jsonl, lambda row: isinstance(row.get("step"), int))

    def drop_after(self, step: int) -> None:
        """Remove the rows of steps after ``step`` (and torn lines at the end) from both files."""
        storage.drop_trailing_lines(self.jsonl, lambda line: _logged_step(_json_step(line), step))
        header = self._csv_header()
        if "step" in header:
            column = header.index("step")
            storage.drop_trailing_lines(self.csv, lambda line: _logged_step(_csv_step(line, column), step))


def _json_step(line: str):
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step") if isinstance(row, dict) else None


def _csv_step(line: str, column: int):
    values = next(csv.reader([line]), [])
    try:
        return int(values[column])
    except (IndexError, ValueError):
        return None


def _logged_step(value, step: int) -> bool:
    """A row to keep: it holds a step, and not one after ``step``."""
    return isinstance(value, int) and value <= step
