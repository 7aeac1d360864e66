"""vLLM's flags for where the model's tokenizer and files come from and how the server listens:
--tokenizer, --load-format, TLS (--ssl-*), --root-path, the access log, --enable-force-include-usage."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest

from cachedattention import LLM, SamplingParams
from cachedattention.cli import build_parser, main
from cachedattention.cli_vllm import uvicorn_options
from tests.server.conftest import engine_config, start_server

TLS = Path(__file__).parent.parent / "data" / "tls"  # a self-signed localhost certificate, for tests only
HELLO = [{"role": "user", "content": "Hello"}]


def test_another_folder_s_tokenizer_serves_a_model_without_one(chat_model_dir, tmp_path, tiny_dirs, caplog):
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(chat_model_dir / f, bare / f)
    params = SamplingParams(max_tokens=3, temperature=0)
    own = LLM(model=str(chat_model_dir)).chat(HELLO, params)[0]
    borrowed = LLM(model=str(bare), tokenizer=str(chat_model_dir)).chat(HELLO, params)[0]
    assert borrowed.prompt_token_ids == own.prompt_token_ids and borrowed.token_ids == own.token_ids
    # more tokens than the model (a pad token added without resizing): served, its ids refused per request
    small = LLM(model=str(tiny_dirs["llama"][0]), tokenizer=str(chat_model_dir))
    assert "has 49152 tokens, more than the model's 256" in caplog.text
    with pytest.raises(ValueError, match="vocabulary"):
        small.generate([[300, 5]], params)
    with pytest.raises(ValueError, match="tokenizer path .* does not exist"):
        LLM(model=str(bare), tokenizer=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        LLM(model=str(chat_model_dir), tokenizer=str(bare))
    args = build_parser().parse_args(["serve", str(bare), "--tokenizer", str(chat_model_dir)])
    from cachedattention.cli import engine_config as cli_engine_config

    assert cli_engine_config(args).tokenizer == str(chat_model_dir)


def test_the_load_format_must_match_the_model_s_files(capsys, tmp_path):
    assert main(["serve", str(tmp_path), "--load-format", "gguf"]) == 2  # refused before the model loads
    assert "--load-format gguf does not match the model" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "m.gguf"), "--load-format", "safetensors"]) == 2


def test_a_port_in_use_is_said_before_the_model_loads(capsys, tmp_path, monkeypatch):
    import cachedattention.server.app as server_app

    def no_model(*_args, **_kwargs):  # reached only if the port was not checked first
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(server_app, "create_app", no_model)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "another --port" in err


def _listening(argv: list[str]) -> dict:
    return uvicorn_options(build_parser().parse_args(["serve", "m", *argv]))


def test_the_listening_flags_become_uvicorn_s_options(tmp_path):
    opts = _listening(["--ssl-keyfile", str(TLS / "key.pem"), "--ssl-certfile", str(TLS / "cert.pem"),
                       "--disable-uvicorn-access-log"])  # fmt: skip
    assert opts["ssl_keyfile"] == str(TLS / "key.pem") and opts["ssl_certfile"] == str(TLS / "cert.pem")
    assert opts["access_log"] is False and opts["ssl_cert_reqs"] == 0
    defaults = _listening([])
    assert defaults["ssl_keyfile"] is None and defaults["access_log"] is True
    both = tmp_path / "both.pem"  # a certificate file that holds its key too serves alone
    both.write_text((TLS / "key.pem").read_text() + (TLS / "cert.pem").read_text())
    assert _listening(["--ssl-certfile", str(both)])["ssl_certfile"] == str(both)
    checked = _listening(["--ssl-certfile", str(both), "--ssl-ca-certs", str(TLS / "cert.pem"), "--ssl-cert-reqs", "2"])
    assert checked["ssl_ca_certs"] == str(TLS / "cert.pem") and checked["ssl_cert_reqs"] == 2
    for argv, says in ((["--ssl-keyfile", str(TLS / "key.pem")], "needs --ssl-certfile"),
                       (["--ssl-keyfile", "/no/key.pem", "--ssl-certfile", str(TLS / "cert.pem")], "is not a file"),
                       (["--ssl-certfile", str(TLS / "cert.pem")], "cannot be used"),  # no key anywhere
                       (["--ssl-certfile", str(TLS / "key.pem"), "--ssl-keyfile", str(TLS / "key.pem")],
                        "cannot be used"),
                       (["--ssl-cert-reqs", "2", "--ssl-ca-certs", str(TLS / "cert.pem")], "over HTTPS only"),
                       (["--ssl-cert-reqs", "2", "--ssl-certfile", str(both)], "give --ssl-ca-certs"),
                       (["--ssl-certfile", str(both), "--ssl-ca-certs", str(both.parent / "bad.pem")], "is not a file"),
                       (["--ssl-certfile", str(both), "--ssl-ca-certs", str(TLS / "key.pem")],
                        "--ssl-ca-certs .* cannot be used")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            _listening(argv)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--root-path", "llm/"])


def test_behind_a_root_path_every_route_keeps_its_key_check_and_metrics(chat_model_dir):
    """A proxy may keep the prefix in the URL or strip it: both route, and neither skips the key check."""
    srv = start_server(engine_config(chat_model_dir, store=False), api_keys=["k"], root_path="/llm",
                       disable_docs=True)  # fmt: skip
    try:
        for path in ("/v1/models", "/llm/v1/models"):
            assert httpx.get(f"{srv.url}{path}", timeout=30).status_code == 401
            assert httpx.get(f"{srv.url}{path}", headers={"Authorization": "Bearer k"}, timeout=30).status_code == 200
        assert httpx.get(f"{srv.url}/llm/health", timeout=30).status_code == 200
        assert httpx.get(f"{srv.url}/openapi.json", timeout=30).status_code == 404  # --disable-fastapi-docs
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
        assert 'endpoint="/v1/models",status="401"' in metrics and 'endpoint="/v1/models",status="200"' in metrics
    finally:
        srv.stop()


def test_https_is_served_with_the_given_key_and_certificate(chat_model_dir):
    import uvicorn

    from cachedattention.server.app import create_app

    opts = _listening(["--ssl-keyfile", str(TLS / "key.pem"), "--ssl-certfile", str(TLS / "cert.pem")])
    app = create_app(engine_config(chat_model_dir, store=False))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", **opts))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    url = f"127.0.0.1:{sock.getsockname()[1]}"
    try:
        trusted = ssl.create_default_context(cafile=str(TLS / "cert.pem"))
        r = httpx.post(f"https://{url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                       verify=trusted, timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not answered
            httpx.get(f"http://{url}/health", timeout=10)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_unix_socket_is_served_with_uds(chat_model_dir, tmp_path):
    import uvicorn

    from cachedattention.server.app import create_app

    path = str(tmp_path / "llm.sock")
    opts = _listening(["--uds", path])
    assert opts["uds"] == path and "uds" not in _listening([])
    server = uvicorn.Server(uvicorn.Config(create_app(engine_config(chat_model_dir, store=False)), lifespan="on",
                                           log_level="warning", **opts))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://llm") as client:
            r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_forced_usage_ends_every_streamed_answer(chat_model_dir):
    srv = start_server(engine_config(chat_model_dir, store=False), force_include_usage=True)
    try:
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=60,
                          json={"messages": HELLO, "max_tokens": 3, "stream": True}) as r:  # fmt: skip
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3
        with httpx.stream("POST", f"{srv.url}/v1/completions", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 2, "stream": True}) as r:  # fmt: skip
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["usage"]["completion_tokens"] == 2
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", timeout=60,
                          json={"messages": HELLO, "max_tokens": 3, "stream": True,
                                "stream_options": {"continuous_usage_stats": True}}) as r:  # fmt: skip
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        content = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
        assert content and all(e["usage"] is not None for e in content)  # forced usage, asked for on every chunk
    finally:
        srv.stop()


def test_the_port_check_binds_as_uvicorn_does():
    """uvicorn listens through asyncio's create_server: an IPv6 address's socket is IPv6 only, so
    `--host ::` serves while another server holds 0.0.0.0 on the port (a dual-stack check refused it)."""
    from cachedattention.uvicorn_run import check_port_free

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as v4:
        v4.bind(("0.0.0.0", 0))
        v4.listen()
        port = v4.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                probe.bind(("::1", 0))
        except OSError:
            pytest.skip("IPv6 is off here")
        check_port_free("::", port)  # (uvicorn serves here)
        with pytest.raises(ValueError, match="another --port"):
            check_port_free("0.0.0.0", port)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6:
        v6.bind(("::", 0))
        v6.listen()
        with pytest.raises(ValueError, match="another --port"):
            check_port_free("::", v6.getsockname()[1])


def test_access_lines_of_the_endpoints_named_are_left_out(chat_model_dir):
    """vLLM's --disable-access-log-for-endpoints: uvicorn's access lines of those paths (a query
    string aside) are dropped, every other request's kept, read from uvicorn's own records."""
    import logging

    import uvicorn

    from cachedattention.server.access_log import ACCESS_LOGGER, quiet_endpoints
    from cachedattention.server.app import create_app

    args = build_parser().parse_args(["serve", "m", "--disable-access-log-for-endpoints", "/health, /metrics"])
    assert args.disable_access_log_for_endpoints == ("/health", "/metrics")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine_config(chat_model_dir, store=False)), lifespan="on",
                                           log_level="info"))  # fmt: skip
    quiet = quiet_endpoints(args.disable_access_log_for_endpoints)
    lines: list[str] = []
    catch = logging.Handler()
    catch.emit = lambda record: lines.append(record.getMessage())
    access = logging.getLogger(ACCESS_LOGGER)
    access.addHandler(catch)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for path in ("/health", "/health?probe=1", "/metrics", "/v1/models"):
            assert httpx.get(url + path, timeout=30).status_code == 200
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(lines) == 1 and '"GET /v1/models HTTP/1.1" 200' in lines[0], lines
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        access.removeHandler(catch)
        access.removeFilter(quiet)


def test_the_access_filter_reads_paths_under_a_root_path_and_keeps_other_lines():
    import logging

    from cachedattention.server.access_log import QuietEndpoints

    def line(path: str) -> logging.LogRecord:  # as uvicorn's access logger writes one
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:5000", "GET", path, "1.1", 200), None)  # fmt: skip

    quiet = QuietEndpoints(["/health"], root_path="/llm")
    assert not quiet.filter(line("/health")) and not quiet.filter(line("/llm/health?x=1"))
    assert quiet.filter(line("/v1/models")) and quiet.filter(line("/llm/v1/models")) and quiet.filter(line("/healthz"))
    assert quiet.filter(logging.LogRecord("uvicorn.access", logging.INFO, "", 0, "plain text", None, None))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--disable-access-log-for-endpoints", "health"])


def test_a_logging_config_file_is_read_before_the_model_and_reaches_uvicorn(tmp_path, capsys):
    from cachedattention.server.app import _configure_logging

    config = {"version": 1, "disable_existing_loggers": False,
              "handlers": {"file": {"class": "logging.FileHandler", "filename": str(tmp_path / "server.log")}},
              "loggers": {"cachedattention.test": {"handlers": ["file"], "level": "INFO"}}}  # fmt: skip
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    assert _listening(["--log-config-file", str(path)])["log_config"] == config and "log_config" not in _listening([])
    _configure_logging(config)
    import logging

    logging.getLogger("cachedattention.test").info("configured")
    for handler in logging.getLogger("cachedattention.test").handlers:
        handler.flush()
    assert "configured" in (tmp_path / "server.log").read_text()
    bad = dict(config, handlers={"file": {"class": "no.such.Handler"}})
    with pytest.raises(ValueError, match="--log-config-file: Python's logging cannot apply it"):
        _configure_logging(bad)
    (tmp_path / "not.json").write_text("handlers:\n  - x")
    for argv, says in (([str(tmp_path / "not.json")], "is not JSON"), ([str(tmp_path / "none.json")], "cannot be read")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "m", "--log-config-file", *argv])
        assert says in capsys.readouterr().err
