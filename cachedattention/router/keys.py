"""What identifies a request's conversation, read from its route, headers and JSON body the way the
replicas read them: a session id (the X-Session-ID header or the body's session_id, with its
cache_salt), a stored response it continues (previous_response_id), or the conversation itself
(a chat's messages up to its first user message; a completions prompt's text)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


@dataclass(frozen=True)
class RouteKey:
    """kind: "session" (a client's session id), "response" (a stored response's id: it lives on the
    replica that made it), "conversation" (hashed like a session) or "prefix" (a plain prompt, found
    by its longest known prefix); value: what identifies it."""

    kind: str
    value: str


def route_key(path: str, headers: Mapping[str, str], body: Any) -> RouteKey | None:
    """The key a generation request is placed by; None when nothing identifies it (a malformed body
    is left for the replica to refuse)."""
    if not isinstance(body, dict):
        return None
    salt = body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else ""
    session = body.get("session_id")
    if not (isinstance(session, str) and session):
        session = headers.get("x-session-id") or None  # (the body wins, as the replicas read it)
    if session is not None:
        return RouteKey("session", f"{session}\x1e{salt}")
    if path.endswith("/responses"):
        prev = body.get("previous_response_id")
        if isinstance(prev, str) and prev:
            return RouteKey("response", prev)
        opening = _opening(body.get("input"))
        if opening is None:
            return None
        return RouteKey("conversation", _canonical({"instructions": body.get("instructions"), "input": opening, "salt": salt}))
    if path.endswith("/chat/completions"):
        opening = _opening(body.get("messages"))
        return None if opening is None else RouteKey("conversation", _canonical({"messages": opening, "salt": salt}))
    if path.endswith("/completions"):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            prompt = prompt[0]  # a batch of prompts: placed by its first
        if isinstance(prompt, list):
            prompt = " ".join(str(t) for t in prompt) + " "  # token ids: a text whose prefixes are the ids'
        return RouteKey("prefix", f"{salt}\x1e{prompt}") if isinstance(prompt, str) and prompt else None
    return None


def _opening(messages: Any) -> list | str | None:
    """A conversation's opening: its messages up to and including the first user message (what
    every later turn of it repeats), or a plain text input."""
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, list) or not messages:
        return None
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return messages[: i + 1]
    return messages


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
