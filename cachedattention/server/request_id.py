"""vLLM's `--enable-request-id-headers`: every answer carries an `X-Request-Id` header, the
request's own when it sent one (a gateway's, to follow it through the logs), else a new one."""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"


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
