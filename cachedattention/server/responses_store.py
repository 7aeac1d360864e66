"""The responses a server keeps for `previous_response_id` and GET /v1/responses/{id}, within a byte budget."""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cachedattention.store.remote import RemoteTier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredResponse:
    """A response object as it was returned, and the conversation it ends as chat messages (its
    input's history and input, then its answer), so the next request can send only what is new."""

    body: dict[str, Any]
    conversation: list[dict[str, Any]]
    session_id: str | None  # the KV store's session the conversation runs in

    def size(self) -> int:
        """Bytes it holds, about (its JSON); a conversation's messages are shared with the responses
        before it, so the sum over-counts: the budget is a bound, never exceeded."""
        return len(json.dumps(self.body, ensure_ascii=False)) + len(json.dumps(self.conversation, ensure_ascii=False))


class ResponseStore:
    """Stored responses by id, least recently used dropped first once their bytes pass `max_bytes`.

    Each response keeps its whole conversation, so dropping one never breaks another's chain. In
    memory: a restart forgets them (their KV, in the store's tiers, stays: a client that sends the
    conversation again reuses it)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the responses store's budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        self.used_bytes = 0
        self.evicted = 0

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, response: StoredResponse) -> bool:
        """Keep it (False when it alone is past the budget: then it is not kept)."""
        self.delete(response_id)
        size = response.size()
        if size > self.max_bytes:
            return False
        while self.used_bytes + size > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.used_bytes -= dropped
            self.evicted += 1
        self._items[response_id] = (response, size)
        self.used_bytes += size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        entry = self._items.get(response_id)
        if entry is None:
            return None
        self._items.move_to_end(response_id)
        return entry[0]

    def delete(self, response_id: str) -> bool:
        entry = self._items.pop(response_id, None)
        if entry is None:
            return False
        self.used_bytes -= entry[1]
        return True

    def check_integrity(self) -> None:
        """The byte count matches the entries, and stays within the budget."""
        total = sum(size for _, size in self._items.values())
        if total != self.used_bytes:
            raise RuntimeError(f"responses store counts {self.used_bytes} bytes, its entries hold {total}")
        if self.used_bytes > self.max_bytes:
            raise RuntimeError(f"responses store holds {self.used_bytes} bytes, past its budget of {self.max_bytes}")
        for rid, (resp, size) in self._items.items():
            if resp.body.get("id") != rid or size != resp.size():
                raise RuntimeError(f"responses store entry {rid} does not match its response")


TOMBSTONE = b"deleted"  # a deleted response's value (no stored response is this JSON)
DELETED = "deleted"


class SharedResponses:
    """Stored responses also kept on the remote tier's server, so that a conversation continues on
    whichever replica a load balancer sends its next request to (its KV follows through the tier).
    A server that cannot be reached, or a value that is not a stored response, counts as absent."""

    def __init__(self, tier: RemoteTier) -> None:
        self.tier = tier

    def put(self, response_id: str, response: StoredResponse) -> None:
        value = {"body": response.body, "conversation": response.conversation, "session_id": response.session_id}
        try:
            self.tier.put_response(response_id, json.dumps(value, ensure_ascii=False).encode())
        except OSError as e:  # the remote tier paused its writes and said so once
            log.debug("responses: %s not shared (%s)", response_id, e)

    def get(self, response_id: str) -> StoredResponse | str | None:
        """The stored response; DELETED if a replica deleted it; None if the server does not hold it
        (never shared, evicted, expired) or cannot be reached."""
        try:
            value = self.tier.get_response(response_id)
        except OSError as e:
            log.debug("responses: %s not read from the remote store (%s)", response_id, e)
            return None
        if value is None:
            return None
        if value == TOMBSTONE:
            return DELETED
        try:
            return _stored_from_json(json.loads(value), response_id)
        except (ValueError, TypeError) as e:
            log.warning("responses: the remote store's %s is not a stored response (%s); not served", response_id, e)
            return None

    def delete(self, response_id: str) -> bool:
        """Whether the server held it. A tombstone takes its place: replicas that hold a copy of
        their own learn from it that the response is gone."""
        try:
            held = self.tier.get_response(response_id) not in (None, TOMBSTONE)
            self.tier.put_response(response_id, TOMBSTONE)
            return held
        except OSError as e:
            log.debug("responses: %s not deleted from the remote store (%s)", response_id, e)
            return False


def _stored_from_json(value: Any, response_id: str) -> StoredResponse:
    if not isinstance(value, dict):
        raise ValueError("it is not an object")
    body, conversation, session = value.get("body"), value.get("conversation"), value.get("session_id")
    if not isinstance(body, dict) or body.get("id") != response_id:
        raise ValueError("its body is not this response's")
    if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
        raise ValueError("its conversation is not a list of messages")
    if session is not None and not isinstance(session, str):
        raise ValueError("its session id is not a string")
    return StoredResponse(body, conversation, session)
