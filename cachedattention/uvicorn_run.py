"""Running a uvicorn server in the foreground until SIGTERM or SIGINT, exiting cleanly."""

from __future__ import annotations

import errno
import signal
import socket

import uvicorn


def check_port_free(host: str, port: int) -> None:
    """A ValueError saying so when `host:port` cannot be listened on, found before a model loads.

    uvicorn binds only after the app is built, so a port another server holds was said once a
    model had loaded (minutes for a large one). This binds as uvicorn will (SO_REUSEADDR, so a port
    in TIME_WAIT is free) and lets go at once; port 0 (any free one) needs no check."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            hint = " (another server holds the port: stop it, or give another --port)" if e.errno == errno.EADDRINUSE else ""
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None


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
