"""Progress for long work: a rich bar on a terminal, plain periodic lines in a log, nothing when off.

A CI log or a pipeline reading stderr sees no terminal, and a bar drawn with cursor movements
would either vanish or fill the log with redraws; there it gets one line every few seconds.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_INTERVAL_S = 5.0  # at most one plain line per bar this often


class Bar:
    """``enabled``: show progress at all. On a terminal (``stream.isatty()``) a transient rich bar
    (with its time-remaining column); otherwise lines like
    ``reap: groups: 3/8 (38%), 12.3 s, ETA 20.5 s - group 4: 1,024 samples/s`` at most every
    ``interval`` seconds, and one when the work ends. ``note`` says what is being worked on now."""

    def __init__(self, enabled: bool, total: float, description: str, stream: TextIO | None = None,
                 interval: float = LOG_INTERVAL_S, clock=time.monotonic):
        self.bar = None
        self.lines: _Lines | None = None
        if not enabled:
            return
        self.description = description
        stream = stream if stream is not None else sys.stderr
        if _is_terminal(stream):
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(transient=True, console=Console(file=stream))
            self.task = self.bar.add_task(description, total=total)
            self.bar.start()
        else:
            self.lines = _Lines(stream, total, description, interval, clock)

    def advance(self, amount: float = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, amount)
        elif self.lines is not None:
            self.lines.update(self.lines.completed + amount)

    def update(self, completed: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed)
        elif self.lines is not None:
            self.lines.update(completed)

    def note(self, text: str) -> None:
        """What the work is doing now (which group is being calibrated, at what rate)."""
        if self.bar is not None:
            self.bar.update(self.task, description=f"{self.description} - {text}")
        elif self.lines is not None:
            self.lines.note = text
            self.lines.update(self.lines.completed)  # a long step still shows up in a log, throttled

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self.lines is not None:
            self.lines.finish()
            self.lines = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Lines:
    """Plain progress lines, throttled to one per ``interval`` seconds."""

    def __init__(self, stream: TextIO, total: float, description: str, interval: float, clock):
        self.stream, self.total, self.description = stream, total, description
        self.interval, self.clock = interval, clock
        self.completed = 0.0
        self.start = clock()
        self.last: float | None = None
        self.note = ""

    def update(self, completed: float) -> None:
        self.completed = completed
        now = self.clock()
        if self.last is None or now - self.last >= self.interval:
            self.last = now
            self._write(now)

    def finish(self) -> None:
        if self.last is not None:  # only close what was opened: a run with no steps prints nothing
            self._write(self.clock(), done=True)

    def _write(self, now: float, done: bool = False) -> None:
        if self.total:
            share = f" ({min(self.completed / self.total, 1.0):.0%})"
            count = f"{self.completed:,.0f}/{self.total:,.0f}{share}"
        else:
            count = f"{self.completed:,.0f}"
        elapsed = now - self.start
        line = f"{self.description}: {count}{' done' if done else ''}, {elapsed:.1f} s"
        if not done and self.total and 0 < self.completed < self.total and elapsed > 0:
            line += f", ETA {elapsed / self.completed * (self.total - self.completed):.1f} s"
        if self.note and not done:
            line += f" - {self.note}"
        print(line, file=self.stream, flush=True)
