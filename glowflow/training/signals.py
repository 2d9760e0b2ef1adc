"""Stopping a run on a signal: :class:`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM (Slurm) into a
stop at the next point where the training state is whole."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Dict, Iterator, Optional


class StopSignals:
    """SIGINT and SIGTERM during :meth:`Trainer.fit`: both raise KeyboardInterrupt (so SIGTERM, what
    Slurm sends before it kills a job, saves last.pt as Ctrl-C does), but not inside a
    :meth:`held` block, where the training state is being changed: there the signal is remembered
    and raised when the block ends. A second signal inside the block raises at once, and
    :attr:`broke_in` says so (the state may then be half changed).

    Installed only in the main thread (where Python delivers signals), and not for a signal the
    process ignores (``nohup``); :meth:`restore` puts the previous handlers back.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.previous: Dict[int, object] = {}
        self.holding: Optional[str] = None  # None: not held; else the note printed when a signal is held
        self.pending: Optional[int] = None
        self.broke_in = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self.previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.holding is not None and self.pending is None:
            self.pending = signum
            if self.holding:
                print(f"\nnote: {self.holding} (interrupt again to stop at once)", file=sys.stderr)
            return
        if self.holding is not None:
            self.broke_in = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self, note: str = "") -> Iterator[None]:
        """A block that a stop signal does not interrupt; KeyboardInterrupt when it ends if one came."""
        self.holding = note
        try:
            yield
        finally:
            self.holding = None
        if self.pending is not None:
            self.pending = None
            raise KeyboardInterrupt
