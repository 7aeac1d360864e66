"""The router's health checks: a replica slow to answer /health (busy, or on a loaded host) stays up
until `health_failures` probes in a row time out; a connection refused or never accepted, or an
error status, marks it down at once; an answer brings it back."""

from __future__ import annotations

import asyncio
import socket

import httpx
from fastapi import FastAPI
from starlette.responses import Response

from cachedattention.router.app import Router
from cachedattention.router.replicas import RouterConfig
from tests.server.conftest import serve_app


def _replica(state: dict):
    """A replica whose /health answers `state["status"]` after `state["delay_s"]`."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        await asyncio.sleep(state["delay_s"])
        return Response(status_code=state["status"])

    return serve_app(app)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # (closed on leaving: a connection to it is refused)


def _unaccepting() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full: a new connection is never accepted (a host
    that is gone, or cut off, as a client sees it)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    held = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(server.getsockname())
        held.append(c)
    return server, held


def test_slow_probes_mark_a_replica_down_only_after_several_in_a_row():
    state = {"delay_s": 0.0, "status": 200}
    replica = _replica(state)
    refused = f"http://127.0.0.1:{_closed_port()}"
    server, held = _unaccepting()
    gone = f"http://127.0.0.1:{server.getsockname()[1]}"
    config = RouterConfig((replica.url, refused, gone), health_timeout_s=1.0, health_failures=3)
    router = Router(config)
    up = router.replicas.up

    async def probes() -> list[tuple[bool, bool]]:
        seen = []
        async with httpx.AsyncClient() as router.client:
            await router.check_health()
            seen.append((up[replica.url], up[refused]))
            assert not up[gone]  # (its connection timed out: down at once)
            state["delay_s"] = 2.0  # slower than the probe's timeout
            for _ in range(3):
                await router.check_health()
                seen.append((up[replica.url], up[refused]))
            state["delay_s"] = 0.0
            await router.check_health()
            seen.append((up[replica.url], up[refused]))
            await router.check_health()  # (a slow probe after an answer counts from one again)
            state["delay_s"] = 2.0
            for _ in range(2):
                await router.check_health()
                seen.append((up[replica.url], up[refused]))
            state["delay_s"], state["status"] = 0.0, 503  # draining: down at once
            await router.check_health()
            seen.append((up[replica.url], up[refused]))
        return seen

    try:
        seen = asyncio.run(probes())
    finally:
        replica.stop()
        for s in [server, *held]:
            s.close()
    assert seen == [(True, False), (True, False), (True, False), (False, False), (True, False),
                    (True, False), (True, False), (False, False)]  # fmt: skip
