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
    """A replica whose /health answers `state["status"]` after `state["delay_s"]`, and whose
    completions answer at once."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> Response:
        await asyncio.sleep(state["delay_s"])
        return Response(status_code=state["status"])

    @app.post("/v1/completions")
    async def completions() -> Response:
        return Response('{"choices": []}', media_type="application/json")

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
    config = RouterConfig((replica.url, refused), health_timeout_s=1.0, health_failures=3)
    router = Router(config)
    up = router.replicas.up

    async def probes() -> list[tuple[bool, bool]]:
        seen = []
        async with httpx.AsyncClient() as router.client:
            await router.check_health()
            seen.append((up[replica.url], up[refused]))
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
    assert seen == [(True, False), (True, False), (True, False), (False, False), (True, False),
                    (True, False), (True, False), (False, False)]  # fmt: skip


def test_a_host_that_never_accepts_the_connection_is_down_at_once():
    server, held = _unaccepting()
    gone = f"http://127.0.0.1:{server.getsockname()[1]}"
    router = Router(RouterConfig((gone,), health_timeout_s=0.5, health_failures=3))

    async def probe() -> bool:
        async with httpx.AsyncClient() as router.client:
            await router.check_health()
        return router.replicas.up[gone]

    try:
        assert not asyncio.run(probe())  # (its connection timed out: down at once, not after 3 probes)
    finally:
        for s in [server, *held]:
            s.close()


def test_a_request_the_replica_answers_breaks_a_row_of_slow_probes():
    state = {"delay_s": 1.0, "status": 200}
    replica = _replica(state)  # (every probe times out: no answer needs to be quick)
    router = Router(RouterConfig((replica.url,), health_timeout_s=0.3, health_failures=3))
    app = FastAPI()
    router.install(app)

    async def probes() -> bool:
        async with httpx.AsyncClient() as router.client:
            for _ in range(2):
                await router.check_health()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
                r = await client.post("/v1/completions", json={"prompt": "hi"})
                assert r.status_code == 200
            for _ in range(2):  # (two more: four slow in all, but not three in a row)
                await router.check_health()
            return router.replicas.up[replica.url]

    try:
        assert asyncio.run(probes())
    finally:
        replica.stop()
