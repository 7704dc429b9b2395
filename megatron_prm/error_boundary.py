"""One error boundary per command: errors caused by user input end as one line and exit status 2.

The project's own errors (bad config, record, store, checkpoint, ...) already name the file, record and
field. The standard errors that bad input raises from deep inside a reader (an unreadable file, text
that is not UTF-8, JSON nested past the recursion limit, a number too large for a float, a value
Python refuses) are caught here too, once, for every command. A traceback is printed only with
``--debug`` or ``MEGATRON_PRM_DEBUG=1``: for a developer, never for bad input.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

DEBUG_VARIABLE = "MEGATRON_PRM_DEBUG"
# Raised by readers on bad input: an unreadable or missing file, undecodable text, JSON nested deeper than
# the recursion limit, numbers that overflow a float, values Python refuses.
INPUT_ERRORS = (OSError, UnicodeError, RecursionError, OverflowError, ValueError)
# The exit status of a command stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED_STATUS = 130


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` or ``MEGATRON_PRM_DEBUG`` set to anything but empty / 0 / false."""
    return flag or os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def describe(err: BaseException, own: tuple[type[BaseException], ...] = ()) -> str:
    """One line for an error: the project's own (``own``) as they say it, the file an OSError names, what a
    RecursionError means."""
    if isinstance(err, own):
        return " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None:
        target = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
        return f"{target}: {err.strerror or type(err).__name__}"
    if isinstance(err, RecursionError):
        return "input nested too deeply to read (JSON deeper than Python's recursion limit)"
    if isinstance(err, UnicodeError):
        return f"text that is not valid UTF-8 ({err})"
    text = " ".join(str(err).split())
    return f"{text or type(err).__name__} ({type(err).__name__})"


def stop_child_processes() -> None:
    """A stop at once (Ctrl-C): end this process's multiprocessing children (DataLoader workers, an
    asynchronous checkpoint writer, the manager process a checkpoint save was starting) before it exits,
    while the exception still holds their pipes open, so that none is orphaned or prints a traceback about
    its vanished parent. SIGKILL, because a forked child inherits the training's stop-signal handlers;
    torch's SIGCHLD handler, which would report the DataLoader workers' end as an error, is reset first."""
    import multiprocessing
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


def run_guarded(prog: str, command: Callable[[], Optional[int]], own: tuple[type[BaseException], ...] = (),
                debug: bool = False) -> int:
    """Run ``command``; the project's errors ``own`` and input errors become ``PROG: error: ...`` on stderr
    and exit status 2, Ctrl-C one line and 130."""
    try:
        return command() or 0
    except KeyboardInterrupt:
        if debug_requested(debug):
            raise
        stop_child_processes()
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED_STATUS
    except (*own, *INPUT_ERRORS) as err:
        if debug_requested(debug):
            raise
        print(f"{prog}: error: {describe(err, own)}", file=sys.stderr)
        return 2
