"""Running a uvicorn server in the foreground until SIGTERM or SIGINT, exiting cleanly."""

from __future__ import annotations

import errno
import signal
import socket

import uvicorn


def check_port_free(host: str, port: int) -> None:
    """A ValueError saying so when `host:port` cannot be listened on, found before a model loads.

    uvicorn binds only after the app is built, so a port another server holds was said once a
    model had loaded (minutes for a large one). This binds as uvicorn's `loop.create_server(host=,
    port=)` will: every address the host resolves to (localhost: 127.0.0.1 and ::1 where both are
    named), SO_REUSEADDR (a port in TIME_WAIT is free), an IPv6 socket for IPv6 only (so `::` is
    free while another server holds 0.0.0.0), and lets go at once; port 0 (any free one) needs no check."""
    if port == 0:
        return
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):  # (each address once, as asyncio)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this machine lacks (IPv6 off): asyncio skips it too
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as e:
        hint = " (another server holds the port: stop it, or give another --port)" if e.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    finally:
        for sock in sockets:
            sock.close()


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
