"""Progress of long loops: a tqdm bar on a terminal, plain status lines in a log file or pipe.

A bar redrawn with carriage returns turns a SLURM log into one unreadable line, so off a terminal the
same loop prints ``desc: N/total unit (rate/s)`` at most every ``interval_s`` seconds, and a closing line
only when it printed any (a short loop stays silent; its caller reports the result).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 30.0


def plural(count: int, noun: str) -> str:
    """``1 process``, ``2 processes``: a count and its noun for a person to read."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{count} {noun}s"


def for_people(value) -> str:
    """A figure rounded for a person (4 decimals; ``n/a`` for None); JSON output keeps full precision."""
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class PlainProgress:
    """The part of tqdm's interface the project uses (iterate, ``update``, ``close``, ``with``)."""

    def __init__(self, iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int], unit: str,
                 stream: TextIO, interval_s: float) -> None:
        self.iterable = iterable
        self.desc, self.total, self.unit = desc, total, unit.strip()
        self.stream, self.interval_s = stream, interval_s
        self.n = 0
        self.started = self.last_line = time.monotonic()
        self.printed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= self.interval_s:
            self._line(now)
            self.last_line = now

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        state = f"done in {elapsed:.0f} s" if final else f"{self.n / elapsed:.1f} {self.unit}/s"
        print(f"{self.desc}: {count} {self.unit} ({state})", file=self.stream, flush=True)
        self.printed = True

    def close(self) -> None:
        if self.printed:
            self._line(time.monotonic(), final=True)
            self.printed = False

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Optional[Iterable] = None, *, desc: str, total: Optional[int] = None, unit: str = "it",
             enabled: bool = True, stream: Optional[TextIO] = None, interval_s: float = PLAIN_INTERVAL_S):
    """A bar on a terminal, plain lines elsewhere, nothing when not ``enabled`` (ranks other than the
    logging one). Use like tqdm: wrap an iterable, or call ``update``/``close``."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if stream.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, file=stream, dynamic_ncols=True)
    return PlainProgress(iterable, desc=desc, total=total, unit=unit, stream=stream, interval_s=interval_s)
