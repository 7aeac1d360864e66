"""One engine per store folder: an exclusive lock on `store_dir/lock`, held while the disk tier is open.

Two engines on one folder would each take the other's files for orphans at start-up (a file being
written, or renamed but not yet indexed, is deleted), and write session records over each other's.
Replicas share KV through the remote tier instead. The lock is the kernel's (`flock`), so a killed
process holds it no longer than it lives.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # (not on Windows: no lock there)
    fcntl = None


log = logging.getLogger(__name__)
_THIS_PROCESS = " (this process)"


class StoreDirInUse(ValueError):
    """Another engine, in this process or another one, has the store folder open."""


class StoreDirLock:
    """Held from construction until `release()` (or until the process ends)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "lock"
        self._file = open(self.path, "a+")  # (a file object: dropped unreleased, it closes and unlocks)
        if fcntl is None:
            return
        if not self._lock() and self._holder() == _THIS_PROCESS:
            gc.collect()  # an engine of this process no longer reachable (`del llm`) closes as it is collected
        if not self._lock():
            holder = self._holder()
            self._file.close()
            stop = "or close() the other one first" if holder == _THIS_PROCESS else "or stop the other one first"
            raise StoreDirInUse(
                f"store_dir {str(root)!r} is in use by another engine{holder}: give each engine its own "
                f"store_dir (replicas share KV through --remote-url), {stop}"
            )
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def _lock(self) -> bool:
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:  # a file system without locks (some network ones): run, and say so
            log.warning("store_dir %s cannot be locked (%s): make sure no other engine uses it", self.path.parent, e)
        return True

    def _holder(self) -> str:
        self._file.seek(0)
        pid = self._file.read().strip()
        if not pid.isdigit():
            return ""
        return _THIS_PROCESS if int(pid) == os.getpid() else f" (process {pid})"

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # (closing the only descriptor of the lock releases it)
