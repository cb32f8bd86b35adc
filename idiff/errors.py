"""Errors that are the user's to fix: the CLI prints the message (no traceback) and exits 2."""

import sys


class UserError(Exception):
    """Bad input: a spec, a flag, a file or a directory. The message names it."""

    exit_code = 2


class RunFailed(Exception):
    """A run stopped for a reason its message explains (e.g. it diverged); exit 1, no traceback."""

    exit_code = 1


def report(err: UserError | RunFailed, prog: str = "idiff") -> int:
    """Print ``err`` as a command's error line; returns its exit code."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return err.exit_code
