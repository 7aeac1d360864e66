"""The responses a server keeps for `previous_response_id` and GET /v1/responses/{id}: in memory
within a byte budget, in a file beside the disk tier's to outlive a restart, and with a remote tier
on its server for every replica."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
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
    input_items: tuple[dict[str, Any], ...] = ()  # its request's input, as items with ids (GET .../input_items)

    def to_json(self) -> bytes:
        value = {"body": self.body, "conversation": self.conversation, "session_id": self.session_id,
                 "input_items": list(self.input_items)}  # fmt: skip
        return json.dumps(value, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes, response_id: str) -> StoredResponse:
        """ValueError unless `data` is the stored response `response_id`."""
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ValueError("it is not an object")
        body, conversation, session = value.get("body"), value.get("conversation"), value.get("session_id")
        if not isinstance(body, dict) or body.get("id") != response_id:
            raise ValueError("its body is not this response's")
        if not isinstance(conversation, list) or not all(isinstance(m, dict) for m in conversation):
            raise ValueError("its conversation is not a list of messages")
        if session is not None and not isinstance(session, str):
            raise ValueError("its session id is not a string")
        items = value.get("input_items", [])  # responses stored before input items were kept: none
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError("its input items are not a list of objects")
        return cls(body, conversation, session, tuple(items))


class ResponseStore:
    """Stored responses by id, least recently used dropped first once their bytes (their JSON) pass
    `max_bytes`. Each keeps its whole conversation, so dropping one never breaks another's chain.

    With `path`, every response is also written to that SQLite file and read back at start: a
    restarted server continues its conversations (their KV is in the store's disk tier). A file that
    cannot be read is set aside (renamed), and one that cannot be written (a full disk) leaves the
    responses in memory only: each with a warning, neither an error. Thread-safe."""

    def __init__(self, max_bytes: int, path: str | Path | None = None) -> None:
        if max_bytes < 0:
            raise ValueError(f"the responses store's budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()
        self.used_bytes = 0
        self.evicted = 0
        self._lock = threading.Lock()
        self._file = _ResponsesFile(Path(path)) if path is not None and max_bytes > 0 else None
        if self._file is not None:
            dropped = []
            for rid, response in self._file.load():
                dropped += self._insert(rid, response, len(response.to_json()))
            self._file.write(None, None, dropped)  # the budget may be smaller than the last run's

    def __contains__(self, response_id: str) -> bool:
        with self._lock:
            return response_id in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def put(self, response_id: str, response: StoredResponse) -> bool:
        """Keep it (False when it alone is past the budget: then it is not kept)."""
        data = response.to_json()
        with self._lock:
            self._remove(response_id)
            if len(data) > self.max_bytes:
                return False
            dropped = self._insert(response_id, response, len(data))
            if self._file is not None:
                self._file.write(response_id, data, dropped)
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            entry = self._items.get(response_id)
            if entry is None:
                return None
            self._items.move_to_end(response_id)
            if self._file is not None:
                self._file.touch(response_id)
            return entry[0]

    def delete(self, response_id: str) -> bool:
        with self._lock:
            if not self._remove(response_id):
                return False
            if self._file is not None:
                self._file.write(None, None, [response_id])
            return True

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _insert(self, response_id: str, response: StoredResponse, size: int) -> list[str]:
        """Add it, dropping the least recently used until it fits; the ids dropped."""
        dropped = []
        while self._items and self.used_bytes + size > self.max_bytes:
            rid, (_, old) = self._items.popitem(last=False)
            self.used_bytes -= old
            self.evicted += 1
            dropped.append(rid)
        self._items[response_id] = (response, size)
        self.used_bytes += size
        return dropped

    def _remove(self, response_id: str) -> bool:
        entry = self._items.pop(response_id, None)
        if entry is not None:
            self.used_bytes -= entry[1]
        return entry is not None

    def check_integrity(self) -> None:
        """The byte count matches the entries, stays within the budget, and the file holds them all."""
        with self._lock:
            total = sum(size for _, size in self._items.values())
            if total != self.used_bytes:
                raise RuntimeError(f"responses store counts {self.used_bytes} bytes, its entries hold {total}")
            if self.used_bytes > self.max_bytes:
                raise RuntimeError(f"responses store holds {self.used_bytes} bytes, past its budget of {self.max_bytes}")
            for rid, (resp, size) in self._items.items():
                if resp.body.get("id") != rid or size != len(resp.to_json()):
                    raise RuntimeError(f"responses store entry {rid} does not match its response")
            if self._file is not None and self._file.writable and self._file.ids() != set(self._items):
                raise RuntimeError("responses store: the file's responses differ from those in memory")


class _ResponsesFile:
    """The stored responses' SQLite file: one row per response (its JSON, when it was last used)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writable = True
        self._db: sqlite3.Connection | None = None
        self._db = self._open()

    def _open(self) -> sqlite3.Connection | None:
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:  # not a database, or damaged: set it aside, start a new one
            aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}")
            log.warning("responses: %s cannot be read (%s); moved to %s, stored responses start empty",
                        self.path, e, aside)  # fmt: skip
            try:
                self.path.rename(aside)
                return self._connect()
            except (OSError, sqlite3.Error) as e2:
                self._give_up(e2)
        except OSError as e:
            self._give_up(e)
        return None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a crash may lose the last responses, never the file
            db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, value BLOB NOT NULL, used REAL NOT NULL)")
            db.execute("SELECT count(*) FROM responses").fetchone()
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _give_up(self, e: BaseException) -> None:
        log.warning("responses: %s cannot be used (%s); stored responses are kept in memory only", self.path, e)
        self.writable = False
        self.close()

    def load(self) -> list[tuple[str, StoredResponse]]:
        """The responses in the file, least recently used first; rows that are not responses are dropped."""
        if self._db is None:
            return []
        out, bad = [], []
        for rid, value in self._db.execute("SELECT id, value FROM responses ORDER BY used").fetchall():
            try:
                out.append((rid, StoredResponse.from_json(value, rid)))
            except (ValueError, TypeError) as e:
                log.warning("responses: %s in %s is not a stored response (%s); dropped", rid, self.path, e)
                bad.append(rid)
        self.write(None, None, bad)
        return out

    def write(self, response_id: str | None, data: bytes | None, dropped: list[str]) -> None:
        """Store one response (if given) and forget the dropped ones, in one transaction."""
        if self._db is None or (response_id is None and not dropped):
            return
        try:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM responses WHERE id = ?", [(rid,) for rid in dropped])
            if response_id is not None:
                self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (response_id, data, time.time()))
            self._db.execute("COMMIT")
        except sqlite3.Error as e:  # a full disk, a file removed underneath: memory keeps serving
            self._rollback()
            self._give_up(e)

    def touch(self, response_id: str) -> None:
        if self._db is None:
            return
        try:
            self._db.execute("UPDATE responses SET used = ? WHERE id = ?", (time.time(), response_id))
        except sqlite3.Error as e:
            self._give_up(e)

    def ids(self) -> set[str]:
        return {rid for (rid,) in self._db.execute("SELECT id FROM responses")} if self._db is not None else set()

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class SharedResponses:
    """Stored responses also kept on the remote tier's server, so that a conversation continues on
    whichever replica a load balancer sends its next request to (its KV follows through the tier).
    The server's copy is the one that counts: what it no longer holds (deleted by any replica,
    evicted, expired) is gone. `get` and `delete` raise OSError when the server cannot be reached."""

    def __init__(self, tier: RemoteTier) -> None:
        self.tier = tier

    def put(self, response_id: str, response: StoredResponse) -> bool:
        """Whether it is on the server now."""
        try:
            self.tier.put_response(response_id, response.to_json())
            return True
        except OSError as e:  # the remote tier paused its writes and said so once
            log.debug("responses: %s not shared (%s)", response_id, e)
            return False

    def get(self, response_id: str) -> StoredResponse | None:
        value = self.tier.get_response(response_id)
        if value is None:
            return None
        try:
            return StoredResponse.from_json(value, response_id)
        except (ValueError, TypeError) as e:
            log.warning("responses: the remote store's %s is not a stored response (%s); not served", response_id, e)
            return None

    def delete(self, response_id: str) -> bool:
        """Whether the server held it."""
        return self.tier.delete_response(response_id)
