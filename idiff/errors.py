"""Errors that are the user's to fix: the CLI prints the message (no traceback) and exits 2.

Every console script runs under ``guarded``: the errors a user can cause or meet (bad input, a file
it cannot read or write, Ctrl-C, a closed pipe) become one line and an exit code; a traceback is left
for bugs, or for everything with IDIFF_DEBUG=1.
"""

import errno
import functools
import os
import reprlib
import sys

DEBUG_VARIABLE = "IDIFF_DEBUG"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


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


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = _BRIEF.maxother = 80
_BRIEF.maxlevel = 2
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6


def brief(value) -> str:
    """``repr(value)`` cut short: messages quote what a user gave, which may be huge."""
    return _BRIEF.repr(value)


# What the user can fix (a path, a permission) is bad input; the rest (disk full, I/O errors) a failure.
_BAD_INPUT_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.EEXIST,
                     errno.ENAMETOOLONG, errno.ELOOP}


def guarded(prog: str):
    """Decorate a console script's ``main(argv=None) -> int``: errors a user meets become one line."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv=None) -> int:
            if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
                return main(argv)
            try:
                code = main(argv)
                sys.stdout.flush()  # here, not at exit, where a closed pipe could no longer be handled
                return code
            except (UserError, RunFailed) as err:
                return report(err, prog)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            except BrokenPipeError:
                # The reader went away (``idiff status RUN | head``): stop quietly, and keep Python
                # from failing once more when it flushes stdout at exit.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 1
            except OSError as err:
                where = f"{err.filename}: " if err.filename else ""
                print(f"{prog}: error: {where}{err.strerror or err} (run with {DEBUG_VARIABLE}=1 for a traceback)",
                      file=sys.stderr)
                return 2 if err.errno in _BAD_INPUT_ERRNOS else 1

        return run

    return decorate
