"""Running a uvicorn server in the foreground until SIGTERM or SIGINT, exiting cleanly."""

from __future__ import annotations

import signal

import uvicorn


def run_until_signal(server: uvicorn.Server) -> int:
    """Serve until SIGTERM/SIGINT; 0 once shut down, else uvicorn's code (a port taken at start-up...)."""
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that a clean exit 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits this way when startup fails
        return e.code if isinstance(e.code, int) else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1
