"""Backs the first pages of the CPU pool at start-up, so that the first request does not pay for them.

The pool is an anonymous mapping that the kernel backs lazily: the first write to each 2 MiB huge
page of each layer's K and V tensors takes a fault that zeroes it (and may compact memory first).
On this project's virtual machines that costs up to ~5 ms per huge page, so an engine's first
request, whose few pages sit in the first huge page of 2 x layers tensors, paid ~250 ms of faults
for ~35 ms of compute. `madvise(MADV_POPULATE_WRITE)` (Linux 5.14+) faults them in at start-up
without writing to them. Later pages still fault in as requests first reach them: doing that in a
background thread instead took a core from the forward passes of a 2-core machine (the demo's
second turn went from 53 to 169 ms while the other engine populated its pool).
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import torch

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23  # <linux/mman.h>; not in Python 3.11's mmap module
HUGE_PAGE = 2 << 20
OS_PAGE = mmap.PAGESIZE


def populate(tensors: list[torch.Tensor], nbytes: int) -> bool:
    """Back the first `nbytes` of each tensor now (whole OS pages); the data is left as it is.

    False, with nothing changed but what was already backed, if the kernel refuses (too old) or
    the C library has no madvise: the pages then fault in on first write, as they would anyway.
    """
    madvise = _libc_madvise()
    if madvise is None:
        return False
    for t in tensors:
        start = t.data_ptr()
        length = min(nbytes, t.numel() * t.element_size())
        begin = start - start % OS_PAGE  # madvise takes page-aligned ranges
        if madvise(begin, start + length - begin, MADV_POPULATE_WRITE) != 0:
            log.debug("MADV_POPULATE_WRITE refused (errno %d): the KV pool faults in lazily", ctypes.get_errno())
            return False
    return True


def _libc_madvise():
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
