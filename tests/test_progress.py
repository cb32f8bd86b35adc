"""Progress lines where no terminal shows a bar: one line per interval with count, percent, rate and ETA."""

import io
import re

from idiff.progress import Progress, format_duration


def test_lines_every_interval_and_at_the_end():
    out = io.StringIO()
    progress = Progress(10, desc="train demo", unit="step", initial=2, every=4, items_per_unit=8, stream=out)
    for _ in range(8):
        progress.update(loss=0.125)
    lines = out.getvalue().splitlines()
    assert [re.match(r"train demo: step (\d+)/10", line).group(1) for line in lines] == ["4", "8", "10"]
    assert lines[0].startswith("train demo: step 4/10 (40.0%) | loss 0.125 | ")
    assert re.search(r"\| [0-9.e+]+ img/s \| elapsed 0:00:0\d, eta 0:00:\d\d$", lines[0]), lines[0]
    assert "eta 0:00:00" in lines[-1]


def test_only_the_reporting_rank_prints():
    out = io.StringIO()
    progress = Progress(3, desc="sample", unit="shard", enabled=False, stream=out)
    progress.update(3)
    assert out.getvalue() == ""


def test_durations():
    assert format_duration(3725.9) == "1:02:05"
    assert format_duration(-1) == "0:00:00"
