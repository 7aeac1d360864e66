"""A request's ids: the client's (its `X-Request-Id` header, else the body's `request_id`), which
the answer's id ends with, and the engine's own key; vLLM's `--enable-request-id-headers`: every
answer carries an `X-Request-Id` header, the request's own when it sent one (a gateway's, to
follow it through the logs), else a new one."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cachedattention.server.api_error import bad

HEADER = b"x-request-id"
MAX_ID_CHARS = 256


def client_request_id(headers: Mapping[str, str], in_body: str | None) -> str | None:
    """The client's id for a request, which the answer's id ends with: its X-Request-Id header
    (a gateway's, to follow the request through every service's logs), else the body's
    `request_id`, else None. The header wins, as vLLM's; an empty one is none."""
    given = headers.get("x-request-id")
    if not given:
        return in_body
    if len(given) > MAX_ID_CHARS or not given.isprintable():
        raise bad(f"the X-Request-Id header must be printable and at most {MAX_ID_CHARS} characters", "X-Request-Id",
                  "invalid_type")  # fmt: skip
    return given


def engine_request_id(answer_id: str, client_given: bool) -> str:
    """The engine's own id for a request answered as `answer_id`: a client's id may come twice at
    once (a gateway's trace id on a retry, several clients' counters), so it gets a suffix there,
    as vLLM's does, and the answer keeps the client's."""
    return f"{answer_id}-{uuid.uuid4().hex[:8]}" if client_given else answer_id


class RequestIdMiddleware:
    """Adds X-Request-Id to each HTTP answer (streamed ones too: the header goes with the start)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER)
        request_id = given or uuid.uuid4().hex.encode()  # (an empty header is none: a new id, as vLLM's)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers") or [] if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
