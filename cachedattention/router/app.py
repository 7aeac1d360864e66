"""`cachedattention router`: one OpenAI-compatible address in front of several replicas, keeping each
conversation on one replica so that its next turn finds its KV there (device, host, disk), spreading
conversations by rendezvous hashing with bounded loads, and failing over to another replica (which
fetches the history from a shared remote tier, or recomputes it) when one is down or draining.

Answers are relayed as the replica sends them, streams included; the replicas check requests and
keys (Authorization passes through). A stored response (the Responses API) is found where it was
made; `DELETE /v1/sessions/ID` reaches every replica."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from starlette.responses import Response, StreamingResponse

from cachedattention.router.affinity import BoundedMap, PrefixTable
from cachedattention.router.keys import RouteKey, route_key
from cachedattention.router.replicas import ReplicaSet, RouterConfig
from cachedattention.uvicorn_run import run_until_signal

log = logging.getLogger(__name__)

# hop-by-hop headers (RFC 9110 7.6.1) and those the relay recomputes
_DROPPED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
            "transfer-encoding", "upgrade", "host", "content-length"}  # fmt: skip
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[A-Za-z0-9_-]{1,128})"')
_LEARN_BYTES = 16 << 10  # a response's id is in its first event or near the top of its JSON
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _error(status: int, message: str, code: str) -> Response:
    """The router's own error in OpenAI's format (not server.api_error's: that module loads the engine)."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


class _TooLarge(Exception):
    pass


class _Relayed(StreamingResponse):
    """A replica's answer streamed through; `on_close` runs however the relay ends (finished, the
    client gone, cancelled), so the upstream connection and the in-flight count are always released."""

    def __init__(self, chunks: AsyncIterator[bytes], status: int, headers: dict[str, str], on_close) -> None:
        super().__init__(chunks, status_code=status, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


class RouterMetrics:
    def __init__(self, urls: list[str]) -> None:
        self.registry = r = CollectorRegistry()
        self.routed = Counter("cachedattention_router_requests", "Requests relayed, by replica and by what placed them",
                              ["replica", "placed_by"], registry=r)  # fmt: skip
        self.failovers = Counter("cachedattention_router_failovers",
                                 "Requests moved on from a replica that could not take them", ["replica"], registry=r)  # fmt: skip
        self.up = Gauge("cachedattention_router_replica_up", "1 if the replica is taking requests", ["replica"], registry=r)
        self.in_flight = Gauge("cachedattention_router_in_flight", "Requests in flight", ["replica"], registry=r)
        for u in urls:
            self.up.labels(u).set(1)
            self.in_flight.labels(u).set(0)


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.replicas = ReplicaSet(config.replicas, config.load_factor)
        self.metrics = RouterMetrics(self.replicas.urls)
        self.response_homes = BoundedMap(config.memory_entries)  # stored response id -> the replica holding it
        self.prefixes = PrefixTable(config.memory_entries)
        self.slow_probes = dict.fromkeys(self.replicas.urls, 0)  # health probes timed out in a row
        self.client: httpx.AsyncClient | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        timeout = httpx.Timeout(connect=self.config.connect_timeout_s, read=None, write=60.0, pool=None)
        self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None))
        checker = asyncio.create_task(self._check_health_forever())
        try:
            yield
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            await self.client.aclose()

    async def _check_health_forever(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.config.health_interval_s)

    async def check_health(self) -> None:
        """Ask every replica's /health. A connection refused or never accepted (the host's kernel
        accepts for a busy server too) or an error status marks it down at once; an answer that
        times out only after `health_failures` in a row, since a replica busy with a long prefill
        (or a router on a loaded host) can be slow to answer and is not down."""

        async def probe(url: str) -> None:
            try:
                r = await self.client.get(f"{url}/health", timeout=self.config.health_timeout_s)
                up = r.status_code == 200
                self.slow_probes[url] = 0
            except httpx.ConnectTimeout:
                up = False
            except httpx.TimeoutException:
                self.slow_probes[url] += 1
                up = self.slow_probes[url] < self.config.health_failures and self.replicas.up[url]
            except httpx.HTTPError:
                up = False
            if up != self.replicas.up[url]:
                log.warning("router: replica %s is %s", url, "up" if up else "down")
            self._mark(url, up)

        await asyncio.gather(*(probe(u) for u in self.replicas.urls))

    def _mark(self, url: str, up: bool) -> None:
        self.replicas.mark(url, up)
        self.metrics.up.labels(url).set(1 if up else 0)

    # -- routes ---------------------------------------------------------------------------------
    def install(self, app: FastAPI) -> None:
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            app.add_api_route(path, self.generate, methods=["POST"])
        app.add_api_route("/v1/responses/{response_id}", self.stored_response, methods=["GET", "DELETE"])
        app.add_api_route("/v1/responses/{response_id}/{action}", self.stored_response, methods=["GET", "POST"])
        app.add_api_route("/v1/sessions/{session_id:path}", self.forget_session, methods=["DELETE"])
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):  # (vLLM's runtime LoRA routes)
            app.add_api_route(path, self.every_replica, methods=["POST"])
        app.add_api_route("/{path:path}", self.anywhere, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])

    async def health(self) -> Response:
        up = len(self.replicas.healthy())
        status = 200 if up else 503
        return Response(json.dumps({"replicas_up": up, "replicas": len(self.replicas.urls)}), status,
                        media_type="application/json")  # fmt: skip

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=METRICS_TYPE)

    async def _body(self, request: Request) -> bytes:
        """The request's body, read up to the router's limit (the replicas hold their own, smaller one)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.config.max_body_bytes:
                raise _TooLarge()
            chunks.append(chunk)
        return b"".join(chunks)

    async def generate(self, request: Request) -> Response:
        body = await self._body(request)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None  # (the replica answers the 400)
        key = route_key(request.url.path, request.headers, parsed)
        order, placed_by, after = self._placement(key)
        learn = self._learn_response_id if request.url.path.endswith("/responses") else None
        return await self._relay(request, body, order, placed_by, retry_404=key is not None and key.kind == "response",
                                 learn=learn, after=after)  # fmt: skip

    def _placement(self, key: RouteKey | None) -> tuple[list[str], str, Callable[[str], None] | None]:
        """The replicas to try in order, what placed the request, and what to remember once a replica
        has answered it."""
        if key is None:
            return self.replicas.order(None), "load", None
        if key.kind == "response":
            return self.replicas.order(key.value, self.response_homes.get(key.value)), "response", None
        if key.kind == "prefix":
            home = self.prefixes.lookup(key.value)
            return (self.replicas.order(None, home), "prefix" if home else "load",
                    lambda url: self.prefixes.record(key.value, url))  # fmt: skip
        return self.replicas.order(key.value), key.kind, None

    async def stored_response(self, request: Request, response_id: str, action: str | None = None) -> Response:
        order = self.replicas.order(response_id, self.response_homes.get(response_id))
        return await self._relay(request, await self._body(request), order, "response", retry_404=True)

    async def forget_session(self, request: Request, session_id: str) -> Response:
        """Every replica forgets it (any of them may hold turns of it: a failover moved it, or it ran
        before the replicas changed): 409 if one has a turn of it running, else 200 if one held it."""
        body = await self._body(request)
        answers = await asyncio.gather(*(self._send_whole(request, url, body) for url in self.replicas.healthy()))
        answers = [a for a in answers if a is not None]
        for status in (409, 200):
            if (found := next((a for a in answers if a.status_code == status), None)) is not None:
                return found
        return answers[0] if answers else _error(503, "no replica is reachable", "no_replica")

    async def every_replica(self, request: Request) -> Response:
        """Sent to every replica (a LoRA adapter added or taken away at run time: any replica may serve
        a conversation's next turn): the first refusal among their answers, else the first answer."""
        body = await self._body(request)
        answers = await asyncio.gather(*(self._send_whole(request, url, body) for url in self.replicas.healthy()))
        answers = [a for a in answers if a is not None]
        if not answers:
            return _error(503, "no replica is reachable", "no_replica")
        return next((a for a in answers if a.status_code >= 300), answers[0])

    async def anywhere(self, request: Request, path: str) -> Response:
        return await self._relay(request, await self._body(request), self.replicas.order(None), "load")

    # -- relaying -------------------------------------------------------------------------------
    async def _relay(self, request: Request, body: bytes, order: list[str], placed_by: str, retry_404: bool = False,
                     learn: Callable[[bytes, str], bool] | None = None,
                     after: Callable[[str], None] | None = None) -> Response:  # fmt: skip
        """Send to the first replica of `order` that takes it: one that cannot be reached is marked
        down and the next tried; a draining one's 503 (or, where the request names a stored
        response, a 404: another replica may hold it) also moves on, but from the last one it is
        the answer."""
        for i, url in enumerate(order):
            last = i == len(order) - 1
            release = self._lease(url)
            try:
                upstream = await self.client.send(self._build(request, url, body), stream=True)
            except httpx.TransportError as e:
                await release()
                log.warning("router: replica %s failed (%s); trying the next", url, e)
                self._mark(url, False)
                self.metrics.failovers.labels(url).inc()
                continue
            except BaseException:  # (cancelled: the router shutting down)
                await release()
                raise
            if not last and (upstream.status_code == 503 or (retry_404 and upstream.status_code == 404)):
                await upstream.aclose()
                await release()
                if upstream.status_code == 503:
                    self.metrics.failovers.labels(url).inc()
                continue
            self._mark(url, True)  # (one marked down that answers is up again)
            self.slow_probes[url] = 0  # (and its slow health probes are no longer in a row)
            self.metrics.routed.labels(url, placed_by).inc()
            if after is not None and upstream.status_code < 400:
                after(url)

            async def close(upstream: httpx.Response = upstream, release=release) -> None:
                await upstream.aclose()
                await release()

            chunks = self._chunks(upstream, url, learn if upstream.status_code < 400 else None)
            return _Relayed(chunks, upstream.status_code, _forwarded(upstream.headers), close)
        return _error(503, "no replica could take the request", "no_replica")

    async def _chunks(self, upstream: httpx.Response, url: str, learn) -> AsyncIterator[bytes]:
        seen = b""
        async for chunk in upstream.aiter_raw():
            if learn is not None and len(seen) < _LEARN_BYTES:
                seen += chunk
                if learn(seen, url):
                    learn = None
            yield chunk

    def _lease(self, url: str) -> Callable[[], Awaitable[None]]:
        """Count a request in flight on `url`; the returned function ends it (once, however often called)."""
        self.replicas.in_flight[url] += 1
        self.metrics.in_flight.labels(url).inc()
        held = [True]

        async def release() -> None:
            if held:
                held.clear()
                self.replicas.in_flight[url] -= 1
                self.metrics.in_flight.labels(url).dec()

        return release

    def _learn_response_id(self, seen: bytes, url: str) -> bool:
        """Remember which replica made a stored response (its id near the top of the answer)."""
        if (m := _RESPONSE_ID.search(seen)) is None:
            return False
        self.response_homes.put(m.group(1).decode(), url)
        return True

    def _build(self, request: Request, url: str, body: bytes) -> httpx.Request:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROPPED]
        return self.client.build_request(request.method, f"{url}{request.url.path}", params=request.url.query,
                                         headers=headers, content=body)  # fmt: skip

    async def _send_whole(self, request: Request, url: str, body: bytes) -> Response | None:
        try:
            r = await self.client.send(self._build(request, url, body))
        except httpx.TransportError:
            self._mark(url, False)
            return None
        headers = {k: v for k, v in _forwarded(r.headers).items() if k.lower() != "content-encoding"}  # (decoded)
        return Response(r.content, r.status_code, headers)


def _forwarded(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROPPED}


def create_router_app(config: RouterConfig) -> FastAPI:
    router = Router(config)
    app = FastAPI(title="CachedAttention router", lifespan=router.lifespan, docs_url=None, redoc_url=None)
    app.state.router = router
    router.install(app)

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, exc: _TooLarge) -> Response:
        return _error(413, f"the request body is larger than the router's limit of {config.max_body_bytes} bytes",
                      "request_too_large")  # fmt: skip

    return app


def run_router(args: argparse.Namespace) -> int:
    """`cachedattention router`: serve until SIGTERM/SIGINT."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: each relayed one and each replica's health check (two lines
    # every 5 s with two replicas); the router's own lines say what matters (a replica down or up)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = RouterConfig(tuple(args.replica), load_factor=args.load_factor, health_interval_s=args.health_interval_s,
                          health_timeout_s=args.health_timeout_s, health_failures=args.health_failures,
                          max_body_bytes=args.max_body_bytes)  # fmt: skip
    # (uvicorn's info level: its "running on" line names the port; no line per request)
    app = create_router_app(config)
    return run_until_signal(uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                                          access_log=False)))  # fmt: skip
