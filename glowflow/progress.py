"""Progress bars: :func:`progress_bar`, the one helper every long loop of glowflow uses (training
epochs, evaluation passes, outlier scoring).

On a terminal it is tqdm's bar, redrawn in place. Anywhere else (a log file, a pipe, a batch job's
output) a redrawn bar fills the file with carriage-return updates, so there it is
:class:`PlainProgress`: one plain line on stderr every :data:`PLAIN_LINE_SECONDS` seconds, such as
``epoch 3/100: 40% (160/400) 1.2 it/s, 2m13s elapsed, about 3m20s left, bpd=3.214``, and none at
all for a pass that ends sooner (what the pass computed is printed after it anyway).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Optional

PLAIN_LINE_SECONDS = 30.0
"""Seconds between two lines of a progress bar whose output is not a terminal."""


def progress_bar(
    iterable: Optional[Iterable] = None,
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
):
    """A progress bar over ``iterable`` (or updated by hand with ``update(n)`` up to ``total``):
    tqdm's on a terminal (stderr is a TTY), else a :class:`PlainProgress`. Both iterate, and have
    ``update``, ``set_postfix`` (``refresh=False``: shown at the next update) and ``close``."""
    if total is None and iterable is not None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    stream = sys.stderr
    if _is_terminal(stream):
        from tqdm import tqdm

        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            disable=disable,
            leave=leave,
            mininterval=1.0,
            dynamic_ncols=True,
            file=stream,
        )
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, disable=disable, stream=stream)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """A progress bar for output that is not a terminal: a plain line (description, percentage,
    count, rate, elapsed and remaining time, postfix) every ``interval`` seconds; none for a pass
    that ends sooner."""

    def __init__(
        self,
        iterable: Optional[Iterable] = None,
        total: Optional[int] = None,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        stream: Any = None,
        interval: Optional[float] = None,
        clock=time.monotonic,
    ):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.disable = disable
        self.stream = stream if stream is not None else sys.stderr
        self.interval = PLAIN_LINE_SECONDS if interval is None else interval
        self.clock = clock
        self.n = 0
        self.postfix = ""
        self.started = self.last_line = clock()
        self.lines = 0  # lines printed so far

    def __iter__(self):
        if self.iterable is None:
            raise TypeError("this progress bar has no iterable: call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._print(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """What the next line ends with (``refresh``: tqdm's argument, without effect here)."""
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        """Nothing to erase or finish: the lines printed are final."""

    def _print(self, now: float) -> None:
        elapsed = now - self.started
        parts = [f"{self.desc}:" if self.desc else "progress:"]
        if self.total:
            parts.append(f"{100.0 * self.n / self.total:.0f}% ({self.n}/{self.total})")
        else:
            parts.append(f"{self.n} {self.unit}")
        rate = self.n / elapsed if elapsed > 0 else 0.0
        timing = f"{rate:.3g} {self.unit}/s, {format_seconds(elapsed)} elapsed"
        if self.total and rate > 0 and self.n < self.total:
            timing += f", about {format_seconds((self.total - self.n) / rate)} left"
        parts.append(timing + (f", {self.postfix}" if self.postfix else ""))
        print(" ".join(parts), file=self.stream, flush=True)
        self.lines += 1


def format_seconds(seconds: float) -> str:
    """'45s', '3m20s', '2h05m'."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
