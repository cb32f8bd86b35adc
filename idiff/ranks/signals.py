"""Preemption: SIGUSR2 / SIGTERM / SIGINT only set a flag; the loop acts on it at a step boundary all ranks agree on.

Slurm (at preemption and the time limit), ``timeout`` and a terminal's Ctrl-C signal every process of
the job, data-loader workers included. Only the main process of a rank decides: its workers ignore
these signals, and so the run can still write its checkpoint before it exits.
"""

import contextlib
import os
import signal
import sys
import threading

import torch
import torch.distributed as dist

from .env import control_group

PREEMPTION_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class PreemptionFlag:
    """Installed in the main thread; the first signal wins. Later ones (a second Ctrl-C, the copy of a
    group signal that a launcher forwards, one during the save) change nothing."""

    def __init__(self, announce: bool = True):
        self.received: str | None = None
        self.announce = announce  # rank 0 says what it received; every rank acts on it
        self._previous = {}
        # Python may run a handler inside another one (a signal and its forwarded copy arrive together): a
        # check-then-set of ``received`` would let both through, so the first takes this lock and keeps it.
        self._first = threading.Lock()

    def install(self) -> "PreemptionFlag":
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if not self._first.acquire(blocking=False):
            return
        self.received = signal.Signals(signum).name
        if self.announce:
            print(f"idiff: received {self.received}; will checkpoint at the next step boundary", file=sys.stderr,
                  flush=True)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()


@contextlib.contextmanager
def held_from_new_processes():
    """Block the preemption signals while worker processes start: a forked worker inherits the mask, so a
    group signal cannot kill it before ``worker_leaves_preemption_to_parent`` ran. The main process receives
    whatever arrived meanwhile once this ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_leaves_preemption_to_parent(worker_id: int = 0) -> None:
    """A data-loader worker's init function: the preemption signals are the main process's business.

    SIGINT and SIGUSR2 are ignored. SIGTERM cannot simply be: the parent ends its workers with SIGTERM
    (also at exit, where it then waits for them), so it stays blocked and a thread takes it, ending the
    worker when it comes from the parent and dropping it otherwise. PyTorch's own worker handler makes the
    same distinction, but dies of a SIGTERM from anyone else, such as a group signal or Slurm.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    for sig in PREEMPTION_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)  # also drops one that came while they were blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(PREEMPTION_SIGNALS) - {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True, name="sigterm").start()


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any rank (one tiny CPU all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=control_group())
    return bool(value.item())
