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
    """``log.jsonl`` (every key) and ``progress.csv`` (columns fixed by the first row), appended across resumes."""

    def __init__(self, run_dir):
        self.jsonl = storage.join(run_dir, "log.jsonl")
        self.csv = storage.join(run_dir, "progress.csv")

    def write(self, row: dict) -> None:
        storage.append_text(self.jsonl, json.dumps(row) + "\n")
        new = not storage.exists(self.csv)
        columns = list(row) if new else next(csv.reader(io.StringIO(storage.read_text(self.csv))))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
        storage.append_text(self.csv, buffer.getvalue())

    def rows(self) -> list[dict]:
        if not storage.exists(self.jsonl):
            return []
        return [json.loads(line) for line in storage.read_text(self.jsonl).splitlines() if line.strip()]
