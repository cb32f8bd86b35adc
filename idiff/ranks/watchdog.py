"""The hang watchdog: a thread that ends its rank when the rank stops making progress.

A rank notes progress (a training step, a sampling shard, an NLL part); when none comes for the timeout, the
watchdog calls ``on_hang`` from its own thread: the main thread may be blocked in a collective or a read that
never returns, so nothing can be asked of it. ``on_hang`` is expected to end the process.

With a fixed timeout (``resources.hang_timeout``) that is the limit. Without one the limit adapts to the run:
AUTO_FACTOR times the slowest interval between two notes so far, and never below AUTO_MIN_S. The interval before
the first note (imports, data, rendezvous, torch.compile) is allowed at least FIRST_PROGRESS_S.
"""

import threading
import time
from collections.abc import Callable

AUTO_MIN_S = 600.0
AUTO_FACTOR = 10.0
FIRST_PROGRESS_S = 1800.0


class Watchdog:
    def __init__(self, on_hang: Callable[[float, int | None], None], timeout_s: float | None = None,
                 poll_s: float = 1.0):
        """``on_hang(waited_s, last_step)``: called once, from the watchdog's thread, when the limit passed."""
        self.on_hang, self.fixed_s, self.poll_s = on_hang, timeout_s, poll_s
        self.last_step: int | None = None  # the latest step (or shard start) noted
        self._last = time.monotonic()
        self._slowest = 0.0  # the longest interval between two notes
        self._noted = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="idiff-watchdog")

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def note(self, step: int | None = None) -> None:
        """Progress: called by the rank's main thread at each step (cheap: two assignments and a clock read)."""
        now = time.monotonic()
        if self._noted:
            self._slowest = max(self._slowest, now - self._last)
        self._last, self._noted = now, True
        if step is not None:
            self.last_step = step

    def limit_s(self) -> float:
        """How long the rank may go without progress now."""
        limit = self.fixed_s if self.fixed_s is not None else max(AUTO_MIN_S, AUTO_FACTOR * self._slowest)
        return limit if self._noted else max(limit, FIRST_PROGRESS_S)

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            waited = time.monotonic() - self._last
            if waited > self.limit_s():
                self.on_hang(waited, self.last_step)
                return
