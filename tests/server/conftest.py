"""Fixtures for the server tests: a tiny random chat model and real uvicorn servers on loopback ports."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachedattention.config import CacheConfig, EngineConfig, StoreConfig

PAGES = 512  # 16-token pages: room for every conversation of a module without evictions


def store_available() -> bool:
    return importlib.util.find_spec("cachedattention.store.connector") is not None


needs_store = pytest.mark.skipif(not store_available(), reason="cachedattention.store.connector is not there yet")


def with_template(chat_model_dir: Path, path: Path, template: str) -> Path:
    """A copy of the tiny chat model with another chat template."""
    shutil.copytree(chat_model_dir, path, dirs_exist_ok=True)
    config_file = path / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["chat_template"] = template
    config_file.write_text(json.dumps(tok_config))
    (path / "chat_template.jinja").unlink(missing_ok=True)  # newer transformers keep the template beside it
    return path


def engine_config(
    model_dir: Path, store: bool, store_dir: str | None = None, prefix_cache: bool = True
) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir),
        cache=CacheConfig(num_pages=PAGES, enable_prefix_cache=prefix_cache),
        store=StoreConfig(enable=store, store_dir=store_dir, host_bytes=64 << 20, disk_bytes=256 << 20),
    )


@dataclass
class RunningServer:
    app: object
    port: int
    server: object
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(config: EngineConfig, **app_kwargs) -> RunningServer:
    """Our server's app for `config` under uvicorn (serve_app)."""
    from cachedattention.server.app import create_app

    return serve_app(create_app(config, **app_kwargs))


def serve_app(app) -> RunningServer:
    """An ASGI app under uvicorn on 127.0.0.1, port chosen by the OS, in a background thread (lifespan on)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(app, sock.getsockname()[1], server, thread)


@pytest.fixture(scope="module")
def server(chat_model_dir) -> Iterator[RunningServer]:
    """The main server under test: no host/disk store, device prefix cache on."""
    s = start_server(engine_config(chat_model_dir, store=False), max_body_bytes=64 << 10)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def store_server(chat_model_dir, tmp_path_factory) -> Iterator[RunningServer]:
    if not store_available():
        pytest.skip("cachedattention.store.connector is not there yet")
    store_dir = tmp_path_factory.mktemp("store")
    s = start_server(engine_config(chat_model_dir, store=True, store_dir=str(store_dir)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    """Sequential greedy chat on an in-process engine that recomputes every prompt (no caches at all)."""
    from cachedattention import LLM
    from cachedattention.sampling import SamplingParams

    llm = LLM(str(chat_model_dir), cache=CacheConfig(num_pages=PAGES, enable_prefix_cache=False))

    def chat(messages: list[dict[str, str]], max_tokens: int) -> str:
        return llm.chat(messages, SamplingParams(max_tokens=max_tokens, temperature=0.0))[0].text

    yield chat
    llm.close()


@dataclass
class CliServer:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


_SERVE_WITHOUT_BENCH = """
import argparse, sys
from cachedattention.cli import add_engine_args
from cachedattention.server.app import serve
p = argparse.ArgumentParser()
p.add_argument("command")
add_engine_args(p)
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", type=int, default=8000)
p.add_argument("--served-model-name", default=None)
p.add_argument("--max-body-bytes", type=int, default=1 << 20)
p.add_argument("--api-key", action="append", default=None)
sys.exit(serve(p.parse_args()))
"""


def launch_cli_server(model_dir: Path, log: Path, *flags: str, timeout_s: float = 300.0) -> CliServer:
    """`python -m cachedattention.cli serve MODEL --port 0 ...`; the bound port is read from uvicorn's log
    (a start takes seconds; the deadline is for a machine loaded many times over)."""
    args = ["serve", str(model_dir), "--host", "127.0.0.1", "--port", "0", "--kv-pool-bytes", str(4 << 20), *flags]
    if importlib.util.find_spec("cachedattention.bench.cli") is not None:
        cmd = [sys.executable, "-m", "cachedattention.cli", *args]
    else:  # cli.py's parser imports bench.cli, still being written: same `serve` flags, same serve(args)
        cmd = [sys.executable, "-c", _SERVE_WITHOUT_BENCH, *args]
    out = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    out.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if found:
            return CliServer(proc, int(found.group(1)), log)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the CLI server did not start:\n{log.read_text(errors='replace')[-3000:]}")
