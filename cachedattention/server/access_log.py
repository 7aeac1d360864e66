"""vLLM's --disable-access-log-for-endpoints: uvicorn's access log without the lines of the paths
named (a load balancer's health probes, a scraper's /metrics), every other request still logged."""

from __future__ import annotations

import logging
from collections.abc import Iterable

ACCESS_LOGGER = "uvicorn.access"


class QuietEndpoints(logging.Filter):
    """Drops uvicorn's access lines for these paths (a query string aside; under --root-path, with
    or without the prefix)."""

    def __init__(self, paths: Iterable[str], root_path: str = "") -> None:
        super().__init__()
        self.paths = frozenset(paths)
        self.root_path = root_path

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 3 or not isinstance(args[2], str):
            return True  # not an access line (client, method, path, version, status): kept
        path = args[2].split("?", 1)[0]
        if self.root_path and path.startswith(self.root_path + "/"):
            return path not in self.paths and path[len(self.root_path) :] not in self.paths
        return path not in self.paths


def quiet_endpoints(paths: Iterable[str], root_path: str = "") -> QuietEndpoints | None:
    """Install the filter on uvicorn's access logger (after uvicorn configured its logging); None when
    no path is named."""
    paths = tuple(paths)
    if not paths:
        return None
    quiet = QuietEndpoints(paths, root_path)
    logging.getLogger(ACCESS_LOGGER).addFilter(quiet)
    return quiet
