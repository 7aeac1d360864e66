"""Errors answered in OpenAI's format."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from cachedattention.server.engine_loop import ServerDraining

INVALID = "invalid_request_error"


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, code: str | None = None, param: str | None = None, type_: str = INVALID
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type_

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str = INVALID, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(body: dict[str, Any], status: int) -> Response:
    # ASCII JSON: an error message that quotes user text can never fail to encode
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


def as_api_error(e: BaseException) -> APIError:
    """An engine request's failure as the HTTP error the client gets."""
    if isinstance(e, ServerDraining):
        return APIError(503, str(e), "server_shutting_down", type_="server_error")
    if isinstance(e, ValueError):
        msg = str(e)
        code = "context_length_exceeded" if "window" in msg else "invalid_value"
        return APIError(400, msg, code, param=getattr(e, "param", None))
    return APIError(500, "internal server error", "internal_error", type_="server_error")


def aborted_error() -> APIError:
    return APIError(
        503, "the request was aborted: the server is shutting down", "request_aborted", type_="server_error"
    )
