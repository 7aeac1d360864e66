"""The error a request is refused with: a ValueError that names the field at fault."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine refuses; `param` names the request field at fault (the server's 400
    reports it as OpenAI's `param`), None when no single field is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class SessionBusy(InvalidRequest):
    """A session cannot be forgotten while a turn of it is running (the server answers 409)."""
