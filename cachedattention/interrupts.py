"""Ctrl-C during `LLM.generate` lands between engine steps, not inside one: a step stopped midway
would leave its pages and the store's bookkeeping half updated, and the next call would find them
so. A second Ctrl-C before the step ends interrupts at once, as before."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StepInterrupted(KeyboardInterrupt):
    """A second Ctrl-C that stopped an engine step midway: what it held may be half updated."""


@contextmanager
def interrupts_between_steps() -> Iterator[Callable[[], None]]:
    """Defers SIGINT while the block runs; the callable it gives raises the KeyboardInterrupt held
    back, and is called between steps (and once more as the block ends, whichever way). Only
    Python's own handler in the main thread is replaced (another handler is the program's, and
    other threads receive no signals)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is not signal.default_int_handler:
        yield lambda: None
        return
    held: list[int] = []

    def hold(signum: int, frame) -> None:
        if held:  # asked twice: the user means now
            held.clear()
            signal.signal(signal.SIGINT, previous)
            raise StepInterrupted
        held.append(signum)

    def raise_held() -> None:
        if held:
            held.clear()
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, hold)
    try:
        yield raise_held
    finally:
        signal.signal(signal.SIGINT, previous)
        raise_held()  # (one that came after the last step, or while an error left the block)
