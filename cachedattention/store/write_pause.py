"""Pauses the disk tier's writes for a while after one fails (a full disk, an I/O error); the
remote tier's calls likewise after one fails (the store is down or unreachable).

While the disk stays full, every segment and record write would fail the same way, each after
encoding a whole segment and each with its own warning: on a small machine
that takes CPU from the forward passes and floods the log. So after a failure, writes are refused
at once for `seconds`, then tried again; the user is told once when writes pause and once when
they work again. Sessions meanwhile stay in host memory as far as it holds them (or, for the
remote tier, are served from the local tiers).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class DiskWritesPaused(OSError):
    """Raised instead of trying a write while the disk tier's writes are paused."""


class WritePause:
    def __init__(
        self,
        seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        what: str = "disk write",
        meanwhile: str = "sessions stay in host memory as far as it holds them",
    ) -> None:
        self.seconds = seconds
        self.what = what  # "disk write": "a disk write failed", "disk writes pause"
        self.meanwhile = meanwhile
        self._clock = clock
        self._until = 0.0
        self._paused = False  # a failure was reported and no write has succeeded since
        self.failures = 0
        self._lock = threading.Lock()  # write-throughs (the I/O thread) and write-backs may fail at once

    def check(self) -> None:
        """Raise DiskWritesPaused while writes are paused; else let the caller try."""
        if self._clock() < self._until:
            raise DiskWritesPaused(f"{self.what}s are paused after a failed {self.what}")

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self.failures += 1
            if not self._paused:
                log.warning("store: a %s failed (%s); %ss pause for %.0f s at a time until one works again, and %s",
                            self.what, error, self.what, self.seconds, self.meanwhile)
            self._paused = True
            self._until = self._clock() + self.seconds

    def succeeded(self) -> None:
        with self._lock:
            if self._paused:
                log.warning("store: %ss work again", self.what)
            self._paused = False
            self._until = 0.0

    def resume(self) -> None:
        """Allow the next write at once (shutdown's flush: its last chance to persist sessions)."""
        with self._lock:
            self._until = 0.0
