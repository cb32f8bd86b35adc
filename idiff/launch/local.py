"""``--nproc N``: N ranks on this machine, each a fresh process with torchrun-style variables.

Signals sent to the launcher (Slurm's USR2/TERM, Ctrl-C) are forwarded to every rank, and the
ranks die with the launcher (PR_SET_PDEATHSIG), so a killed launcher never leaves orphans training.
When a rank fails, the others get GRACE_S to end on their own (their collectives fail), then are killed:
a stopped or hung rank never ends by itself.
A signal sent to the whole process group (Ctrl-C in a terminal, ``timeout``, Slurm) thus reaches each
rank twice, directly and forwarded: a rank acts on the first and ignores repeats.
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time

from ..ranks.faults import exit_meaning

FORWARDED = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
PR_SET_PDEATHSIG = 1
GRACE_S = 10.0
STOPPED_ON_PURPOSE = (75, 130)  # preempted, interrupted: every rank stops at the same step boundary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_local_ranks(argv: list[str], nproc: int) -> int:
    """Run ``idiff <argv>`` as ``nproc`` ranks; the exit code is the first failure's, else 0."""
    port = free_port()
    procs = []

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Before the first rank starts: a Ctrl-C from now on reaches the ranks, not the launcher as KeyboardInterrupt.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        for rank in range(nproc):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "IDIFF_LAUNCHER": "local"}
            procs.append(subprocess.Popen([sys.executable, "-m", "idiff.cli", *argv], env=env,
                                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None))
        return _wait(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(procs, grace_s: float = GRACE_S) -> int:
    """Wait for all ranks; once one fails, give the others ``grace_s`` to notice, then kill them. The exit code
    is the first failure's (a shell's 128+N for a signal N), the cause rather than what it led to."""
    first = None  # (rank, exit code) of the first rank seen ending with a code other than 0
    failed_at = None
    while True:
        alive = [p for p in procs if p.poll() is None]
        if first is None:
            first = next(((rank, _shell_code(p.returncode)) for rank, p in enumerate(procs)
                          if p.returncode not in (None, 0)), None)
            if first is not None:
                failed_at = time.monotonic()
                if first[1] not in STOPPED_ON_PURPOSE:
                    rest = f": ending the other ranks within {grace_s:g} s" if alive else ""
                    print(f"idiff: rank {first[0]} {exit_meaning(first[1])} (exit {first[1]}){rest}", file=sys.stderr,
                          flush=True)
        if not alive:
            return 0 if first is None else first[1]
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for p in alive:
                p.kill()
        time.sleep(0.1)


def _shell_code(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode  # killed by signal N -> 128+N, as a shell reports it
