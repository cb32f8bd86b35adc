"""Where a job is, for whoever reads its log: a tqdm bar on a terminal, plain lines anywhere else.

Slurm output files, ``docker logs`` and pipes cannot show a bar that redraws itself, and a log of
carriage returns says nothing until the job ends. There, rank 0 prints one line every ``every`` units:
how far (count, total, percent), the job's own numbers (loss, ...), the rate, the time spent and the
time left (ETA).
"""

import sys
import time

from tqdm.auto import tqdm


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class Progress:
    """Progress of ``total`` units (steps, shards, parts) from ``initial``.

    ``enabled``: whether this process reports at all (rank 0). ``every``: units between two lines when the
    stream is not a terminal. ``items_per_unit``: what one unit processes (images per step), for the rate.
    """

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 every: int | None = None, items_per_unit: int | None = None, item: str = "img", stream=None):
        self.total, self.desc, self.unit, self.count = total, desc, unit, initial
        self.stream = stream or sys.stderr
        self.items_per_unit, self.item = items_per_unit, item
        self.every = max(1, every or total // 20 or 1)
        self.enabled = enabled
        self.started, self.start_count = time.monotonic(), initial
        self.fields: dict = {}
        interactive = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                        file=self.stream) if interactive else None

    def update(self, n: int = 1, **fields) -> None:
        """``n`` more units done; ``fields`` (loss=..., ...) are shown from now on."""
        self.count += n
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(n)
            if fields:
                self.bar.set_postfix({k: _short(v) for k, v in self.fields.items()}, refresh=False)
        elif self.enabled and (self.count % self.every < n or self.count >= self.total):
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = self.count - self.start_count
        percent = 100.0 * self.count / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.unit} {self.count}/{self.total} ({percent:.1f}%)"]
        parts += [f"{name} {_short(value)}" for name, value in self.fields.items()]
        if done > 0 and elapsed > 0:
            rate = done * (self.items_per_unit or 1) / elapsed
            parts.append(f"{rate:.3g} {self.item if self.items_per_unit else self.unit}/s")
            remaining = (self.total - self.count) * elapsed / done
            parts.append(f"elapsed {format_duration(elapsed)}, eta {format_duration(remaining)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
