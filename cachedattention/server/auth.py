"""vLLM's `--api-key`: requests to the OpenAI routes (/v1/...) and to SageMaker's /invocations
must carry `Authorization: Bearer KEY` for one of the server's keys, or are answered 401 in OpenAI's
format before their body is read. /health, /ping, /metrics, /version, /tokenize and /detokenize stay
open, as in vLLM (a load balancer's probes and a metrics scraper carry no key)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from cachedattention.server.api_error import error_body, error_response

PROTECTED_PREFIXES = ("/v1", "/invocations")  # every route that generates


class RootPathMiddleware:
    """Serves the app under a proxy's path prefix (vLLM's --root-path): the prefix becomes the
    request's root path, and the routes match with or without it in the URL."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope = {**scope, "root_path": self.root_path}
        await self.app(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path the routes match: behind a proxy that keeps the app's root path (--root-path) in the
    URL, without it (as Starlette's router reads it), so that no check is skipped by the prefix."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :]
    return path
API_KEY_ENVS = ("CACHEDATTENTION_API_KEY", "VLLM_API_KEY")  # read by `serve` when --api-key is not given, in this order


def checked_api_keys(keys: Sequence[str]) -> tuple[str, ...]:
    """The keys, each a non-empty string of printable ASCII without spaces (what a header carries)."""
    keys = tuple(keys)
    for key in keys:
        if not isinstance(key, str) or not key or not key.isascii() or not key.isprintable() or " " in key:
            raise ValueError("an API key must be a non-empty string of printable ASCII characters without spaces")
    return keys


def api_keys_from(flags: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[str, ...]:
    """`serve`'s keys: the --api-key flags, or else $CACHEDATTENTION_API_KEY, or else $VLLM_API_KEY
    (a deployment moved from vLLM keeps its key: it must not come up open)."""
    if flags:
        return tuple(flags)
    found = next((environ[name] for name in API_KEY_ENVS if environ.get(name)), None)
    return (found,) if found else ()  # create_app checks the keys, wherever they came from


class ApiKeyMiddleware:
    """Answers 401 to a /v1 or /invocations request whose Authorization header is not `Bearer <one of the keys>`
    (compared in constant time, so the answer's timing tells nothing of a key)."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]) -> None:
        self.app = app
        self.expected = [f"Bearer {key}".encode() for key in checked_api_keys(keys)]

    def _allowed(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":  # CORS preflights carry no credentials
            return True
        path = route_path(scope)
        if not any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES):
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        # every key compared, whichever matches, so the time taken does not tell which one did
        return sum(hmac.compare_digest(given, want) for want in self.expected) > 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = error_body("a valid API key is required: send the header 'Authorization: Bearer <key>'",
                          code="invalid_api_key")  # fmt: skip
        response = error_response(body, 401)
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
