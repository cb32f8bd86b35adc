"""Preemption: SIGUSR2 / SIGTERM only set a flag; the loop acts on it at a step boundary all ranks agree on."""

import signal
import sys

import torch
import torch.distributed as dist

from .env import control_group

PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class PreemptionFlag:
    """Installed in the main thread; the first signal wins, later ones (e.g. during the save) only log."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
        print(f"idiff: received {name}; will checkpoint at the next step boundary", file=sys.stderr, flush=True)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any rank (one tiny CPU all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=control_group())
    return bool(value.item())
