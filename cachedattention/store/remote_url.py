"""A remote tier's address checked (a Redis-protocol URL), apart from the tier itself so that the
configuration, and the command line that builds it, need no torch."""

from __future__ import annotations

from urllib.parse import urlsplit

SCHEMES = ("redis", "rediss", "unix")


def check_remote_url(url: str) -> None:
    """ValueError unless `url` names a Redis-protocol server (redis://, rediss://, unix://)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"remote_url must be a Redis-protocol URL (redis://HOST:PORT/DB, rediss://..., unix:///PATH.sock), got {url!r}"
        )
    if parts.scheme == "unix" and not parts.path:
        raise ValueError(f"remote_url {url!r} names no socket path (unix:///PATH.sock)")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"remote_url {url!r} names no host ({parts.scheme}://HOST:PORT)")
