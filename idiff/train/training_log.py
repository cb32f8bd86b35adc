"""Training metrics: accumulated on the device without host syncs, reduced over ranks once per log row."""

import csv
import importlib.util
import io
import json
import math
import os

import torch
import torch.distributed as dist
from pydantic import with_config
from typing_extensions import Required, TypedDict

from .. import storage
from ..errors import UserError
from ..run_dir import RunDir
from ..visualize import Curve, plot_losses

QUARTILES = 4
KEYS = ("loss", "mse", "vb")


class StepStats:
    """Sums of each loss term, overall and per timestep quartile (as the original logs ``loss_q0``...)."""

    def __init__(self, num_timesteps: int, device):
        self.num_timesteps = num_timesteps
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


class TrainingLog:
    """``log.jsonl`` (every key), ``progress.csv`` and, with ``tensorboard``, event files in ``tensorboard/``,
    appended across resumes. Each row costs O(row) whatever the run's length: the csv header and the loss
    curves for loss.png are kept in memory, read from the files once per process.

    progress.csv's columns are those of the first row; a key first seen later widens the header, rewriting only
    the piece that holds it (see storage.replace_first_line), so rows written before it are shorter (their new
    cells are empty, as csv readers read them). That happens at most once per key in a run, where a fixed column
    list would silently drop whatever the loop adds later.

    A resumed run first drops the rows of the steps after its checkpoint (``drop_after``): it logs them again.
    """

    def __init__(self, run_dir, tensorboard: bool = False):
        run_dir = RunDir(run_dir)
        self.jsonl, self.csv = run_dir.log_file, run_dir.progress_file
        self._columns = None  # progress.csv's header, read once
        self._history = None  # the LossHistory of log.jsonl, read once
        self._board = summary_writer(run_dir.tensorboard) if tensorboard else None

    def write(self, row: dict) -> None:
        history = self._loss_history()  # read before this row is in the file
        storage.append_text(self.jsonl, json.dumps(row) + "\n")
        self._write_csv(row)
        history.add(row)
        if self._board is not None:
            self.add_scalars_at(row["step"], {k: v for k, v in row.items() if k != "step"}, prefix="train")

    def _write_csv(self, row: dict) -> None:
        if self._columns is None:
            self._columns = self._csv_header()
        added = [key for key in row if key not in self._columns]
        buffer = io.StringIO()
        if added:
            self._columns = self._columns + added
            header = io.StringIO()
            csv.writer(header).writerow(self._columns)
            if self._columns != added:  # rows were written under the narrower header
                storage.replace_first_line(self.csv, header.getvalue())
            else:
                buffer.write(header.getvalue())
        csv.DictWriter(buffer, fieldnames=self._columns, extrasaction="ignore").writerow(row)
        storage.append_text(self.csv, buffer.getvalue())

    def _csv_header(self) -> list[str]:
        return next(csv.reader([storage.read_first_line(self.csv)]), [])

    def _loss_history(self) -> "LossHistory":
        if self._history is None:
            self._history = LossHistory()
            for row in self.rows():
                self._history.add(row)
        return self._history

    def plot(self, path) -> None:
        """loss.png from the kept curves (nothing before the first row): a fixed cost, however long the run."""
        curves = self._loss_history().curves()
        if curves:
            plot_losses(curves, path)

    def add_image(self, tag: str, images, step: int) -> None:
        """Uint8 NHWC images (a preview grid's) to TensorBoard, when it is on."""
        if self._board is not None:
            self._board.add_images(tag, images, step, dataformats="NHWC")

    def add_scalars_at(self, step: int, values: dict, prefix: str) -> None:
        """The numbers in ``values`` to TensorBoard as ``prefix/key`` at ``step`` (e.g. evaluation metrics)."""
        if self._board is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._board.add_scalar(f"{prefix}/{key}", value, step)

    def flush(self) -> None:
        """Make what TensorBoard was given readable (at each save; it also flushes every 2 minutes)."""
        if self._board is not None:
            self._board.flush()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()

    def rows(self) -> list[dict]:
        """The rows of log.jsonl; torn, garbage or wrongly typed lines are skipped with a warning."""
        return storage.read_jsonl(self.jsonl, is_log_row)

    def drop_after(self, step: int) -> None:
        """Remove the rows of steps after ``step`` (and torn lines at the end) from both files."""
        storage.drop_trailing_lines(self.jsonl, lambda line: _logged_step(_json_step(line), step))
        self._history = None
        header = self._csv_header()
        if "step" in header:
            column = header.index("step")
            storage.drop_trailing_lines(self.csv, lambda line: _logged_step(_csv_step(line, column), step))


@with_config(storage.LOG_RECORD)
class LogRow(TypedDict, total=False):
    """A row of log.jsonl, as its readers (loss.png, idiff status) use it; other keys are kept."""
    step: Required[storage.Int64]
    loss: float
    mse: float
    vb: float
    loss_q0: float
    loss_q3: float
    images_per_s: float


is_log_row = storage.conforms(LogRow)


class LossHistory:
    """The loss curves of a whole run in at most ``size`` points (even), for loss.png. A point holds the mean,
    min and max of each key over ``width`` consecutive rows; once all points are used, neighbours merge pairwise
    and ``width`` doubles. Memory and the plot's cost stay fixed however long the run; a row costs amortised O(1).
    """

    KEYS = ("loss", "mse", "vb", "loss_q0", "loss_q3")

    def __init__(self, size: int = 512):
        self.size = size
        self.width = 1
        self.points: list[_Point] = []

    def add(self, row: dict) -> None:
        full = bool(self.points) and self.points[-1].rows == self.width
        if full and len(self.points) == self.size:
            self.points = [a.merged(b) for a, b in zip(self.points[::2], self.points[1::2])]
            self.width *= 2
        if not self.points or self.points[-1].rows == self.width:
            self.points.append(_Point())
        self.points[-1].add(row)

    def curves(self) -> dict[str, Curve]:
        curves = {}
        for key in self.KEYS:
            points = [(p.step_sum / p.rows, p.stats[key]) for p in self.points if key in p.stats]
            if points:
                curves[key] = Curve(steps=[step for step, _ in points],
                                    mean=[total / count for _, (count, total, _, _) in points],
                                    low=[low for _, (_, _, low, _) in points],
                                    high=[high for _, (_, _, _, high) in points])
        return curves


class _Point:
    """Consecutive log rows of a LossHistory: their number, the sum of their steps, and per key the count, sum,
    min and max of its finite values (a non-finite loss is a skipped step, counted in nonfinite_steps)."""

    def __init__(self):
        self.rows = 0
        self.step_sum = 0
        self.stats: dict[str, list] = {}

    def add(self, row: dict) -> None:
        self.rows += 1
        self.step_sum += row["step"]
        for key in LossHistory.KEYS:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._include(key, [1, value, value, value])

    def merged(self, other: "_Point") -> "_Point":
        point = _Point()
        point.rows, point.step_sum = self.rows + other.rows, self.step_sum + other.step_sum
        for source in (self, other):
            for key, stats in source.stats.items():
                point._include(key, stats)
        return point

    def _include(self, key: str, stats: list) -> None:
        mine = self.stats.get(key)
        if mine is None:
            self.stats[key] = list(stats)
        else:
            mine[:] = [mine[0] + stats[0], mine[1] + stats[1], min(mine[2], stats[2]), max(mine[3], stats[3])]


def require_tensorboard() -> None:
    """A UserError when the tensorboard package is missing (found without importing it: that is slow)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("train.tensorboard is true but the tensorboard package is not installed: "
                        "pip install 'idiff[tensorboard]' (or set train.tensorboard: false)")


def check_tensorboard(spec) -> None:
    """For the pre-checks of a job, before its run dir is written: a train job that asks for TensorBoard has it."""
    train = getattr(spec, "train", None)
    if train is not None and train.tensorboard:
        require_tensorboard()


def summary_writer(folder: str):
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter  # imported only when on: it pulls in tensorboard

    return SummaryWriter(log_dir=folder)


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


LOG_TAIL_BYTES = 1 << 16  # the last rows of log.jsonl: enough for the latest, whatever the run's length


def last_log_row(run_dir: RunDir) -> dict | None:
    """The newest row of log.jsonl, reading only the file's tail; unreadable lines in it are counted in a warning,
    as a whole read would (storage.read_jsonl)."""
    path = run_dir.log_file
    if not storage.exists(path):
        return None
    if storage.is_remote(path):
        lines = storage.read_appended(path).splitlines()
    else:
        with storage.open_for_reading(path) as f:
            start = max(0, os.path.getsize(path) - LOG_TAIL_BYTES)
            f.seek(start)
            lines = f.read().decode("utf-8", errors="replace").splitlines()[1 if start else 0:]  # a cut first line
    rows = storage.parse_jsonl(lines, is_log_row, path)
    return rows[-1] if rows else None
