"""The training log's I/O per row stays flat however long the run: no re-reading of log.jsonl / progress.csv per
row or per loss.png, and appends to a blob store rewrite a bounded piece, not the whole file.

Bytes are measured by the kernel (/proc/self/io: rchar/wchar count every read/write system call of the process),
so a re-read through any path (storage, blobfile, a plain open) shows. Blob stores are not reachable here; their
code path runs on local files by making ``storage.is_remote`` say yes (blobfile reads and writes local paths
the same way), which is the seam storage uses to choose it.
"""

import csv
import io
import json
import math
import os
import random

import pytest

from idiff import storage
from idiff.train.training_log import LossHistory, TrainingLog

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")

KEYS = ("loss", "mse", "vb", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "lr", "step_time_s")


def io_bytes(kind: str) -> int:
    """Bytes this process has read (``rchar``) or written (``wchar``) through system calls so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(kind))


def log_row(step: int, rng: random.Random) -> dict:
    return {"step": step, **{key: rng.uniform(0.01, 1) for key in KEYS}, "images_seen": 128 * step}


@pytest.fixture
def on_a_blob_store(monkeypatch):
    """storage takes its blob-store path for every file; small pieces so that a test makes many."""
    monkeypatch.setattr(storage, "is_remote", lambda path: True)
    monkeypatch.setattr(storage, "PART_SIZE", 4096)
    monkeypatch.setattr(storage, "_filling", {})


def test_a_log_row_reads_nothing_back_however_long_the_log_is(tmp_path):
    log, rng = TrainingLog(tmp_path), random.Random(0)
    for step in range(1, 1001):
        log.write(log_row(step, rng))
    before = io_bytes("rchar")
    for step in range(1001, 2001):
        log.write(log_row(step, rng))
    read = io_bytes("rchar") - before
    # Re-reading progress.csv (or log.jsonl) per row would read about 1000 x 400 kB here.
    assert read < 64 * 1024, f"1000 log rows read {read} bytes"
    assert len((tmp_path / "progress.csv").read_text().splitlines()) == 2001


def test_loss_png_is_drawn_from_a_bounded_history_not_the_log(tmp_path, monkeypatch):
    log, rng = TrainingLog(tmp_path), random.Random(1)
    for step in range(1, 3001):
        log.write(log_row(step, rng))
    reads = []
    for name in ("read_appended", "read_first_line", "read_jsonl", "read_text", "read_bytes"):
        real = getattr(storage, name)
        monkeypatch.setattr(storage, name, lambda *args, _real=real, _name=name, **kw: reads.append(_name) or
                            _real(*args, **kw))
    log.plot(tmp_path / "loss.png")
    assert reads == []  # the curves come from memory, not from log.jsonl
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len(log._loss_history().points) <= LossHistory().size


def test_the_bounded_history_keeps_the_mean_min_and_max_of_every_row_and_restores_alike(tmp_path):
    log, rng = TrainingLog(tmp_path), random.Random(2)
    rows = [log_row(step, rng) for step in range(1, 5001)]
    rows[1234]["loss"] = math.nan  # a non-finite step: left out of the curve, as it is out of the model
    for row in rows:
        log.write(row)
    history = log._loss_history()
    assert len(history.points) <= history.size and sum(p.rows for p in history.points) == len(rows)
    finite = [row["loss"] for row in rows if math.isfinite(row["loss"])]
    loss = history.curves()["loss"]
    counts = [p.stats["loss"][0] for p in history.points]
    assert sum(m * c for m, c in zip(loss.mean, counts)) / sum(counts) == pytest.approx(sum(finite) / len(finite))
    assert min(loss.low) == min(finite) and max(loss.high) == max(finite)
    assert loss.steps == sorted(loss.steps)
    # A resumed run rebuilds it from log.jsonl once: the same points as the process that wrote the rows.
    assert TrainingLog(tmp_path)._loss_history().curves() == history.curves()


def test_a_key_that_appears_mid_run_widens_the_csv_header_once(tmp_path):
    log = TrainingLog(tmp_path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 0.5})
    for step in range(6, 9):
        log.write({"step": step, "loss": 0.5, "grad_norm": 2.0})
    with open(tmp_path / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [r["grad_norm"] for r in rows] == [None] * 5 + ["2.0"] * 3  # rows before it have no such cell
    resumed = TrainingLog(tmp_path)  # the widened header is the one a resumed run reads
    resumed.write({"step": 9, "loss": 0.5, "grad_norm": 3.0})
    assert (tmp_path / "progress.csv").read_text().splitlines()[-1] == "9,0.5,3.0"


def test_blob_store_appends_rewrite_a_bounded_piece_and_read_back_in_order(tmp_path, on_a_blob_store):
    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": step, "loss": 0.123456789}) + "\n" for step in range(1, 2001)]
    before = io_bytes("wchar")
    for line in lines:
        storage.append_text(path, line)
    written = io_bytes("wchar") - before
    # Rewriting the whole file per row would write about 2000 x 40 kB; a piece is at most PART_SIZE + a row.
    assert written < len(lines) * (storage.PART_SIZE + len(lines[0]))
    pieces = sorted(p.name for p in tmp_path.iterdir())
    assert pieces[0] == "log.jsonl" and 1 < len(pieces) <= math.ceil(sum(map(len, lines)) / storage.PART_SIZE)
    assert [r["step"] for r in storage.read_jsonl(path, lambda r: True)] == list(range(1, 2001))
    assert storage.read_first_line(path) == lines[0]
    # Another process (a resumed job) continues the last piece instead of starting one per job.
    storage._filling.clear()
    storage.append_text(path, json.dumps({"step": 2001}) + "\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == pieces
    assert storage.read_jsonl(path, lambda r: True)[-1] == {"step": 2001}


def test_a_resume_on_a_blob_store_cuts_the_pieces_back_to_its_step(tmp_path, on_a_blob_store):
    log, rng = TrainingLog(tmp_path), random.Random(3)
    for step in range(1, 301):
        log.write(log_row(step, rng))
    assert any(".part" in p.name for p in tmp_path.iterdir())
    storage._filling.clear()  # a new process
    resumed = TrainingLog(tmp_path)
    resumed.drop_after(120)
    assert [r["step"] for r in resumed.rows()] == list(range(1, 121))
    for step in range(121, 151):
        resumed.write(log_row(step, rng))
    csv_rows = list(csv.DictReader(io.StringIO(storage.read_appended(tmp_path / "progress.csv"))))
    assert [int(r["step"]) for r in csv_rows] == list(range(1, 151))
    assert [r["step"] for r in resumed.rows()] == list(range(1, 151))
    # A new column rewrites only the piece that holds the header.
    resumed.write({**log_row(151, rng), "nonfinite_steps": 0})
    csv_rows = list(csv.DictReader(io.StringIO(storage.read_appended(tmp_path / "progress.csv"))))
    assert [r["nonfinite_steps"] for r in csv_rows[-2:]] == [None, "0"] and len(csv_rows) == 151
