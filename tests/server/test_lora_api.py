"""LoRA adapters over HTTP, as vLLM serves them: --lora-modules names them, a request's `model`
picks one, /v1/models lists them, and a session's KV is kept apart by adapter."""

from __future__ import annotations

import argparse

import httpx
import pytest

from cachedattention.cli_vllm import lora_module
from cachedattention.config import CacheConfig, EngineConfig, LoRAConfig, StoreConfig
from tests.lora_files import ATTENTION, MLP, write_adapter
from tests.server.conftest import PAGES, start_server
from tests.server.test_server import client


@pytest.fixture(scope="module")
def adapters(chat_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    write_adapter(chat_model_dir, folder / "sql", ATTENTION + MLP, r=8, seed=3)
    write_adapter(chat_model_dir, folder / "poet", ["q_proj", "v_proj"], r=4, seed=4)
    return folder


def lora_config(model_dir, store_dir=None) -> EngineConfig:
    return EngineConfig(model=str(model_dir), cache=CacheConfig(num_pages=PAGES),
                        store=StoreConfig(enable=store_dir is not None, store_dir=store_dir),
                        lora=LoRAConfig(enable=True, max_loras=2))  # fmt: skip


def test_a_request_s_model_picks_its_adapter(chat_model_dir, adapters, tmp_path):
    from cachedattention import LLM, LoRARequest, SamplingParams

    server = start_server(lora_config(chat_model_dir, str(tmp_path / "store")),
                          lora_modules=[("sql", str(adapters / "sql")), ("poet", str(adapters / "poet"))])  # fmt: skip
    try:
        c = client(server.url)

        def turn(model):
            return c.chat.completions.create(model=model, messages=conv, max_tokens=6, temperature=0,
                                             extra_body={"session_id": "u"})  # fmt: skip

        conv = [{"role": "user", "content": "Write a query."}]
        first = turn("sql")
        conv += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Now sort it."}]  # fmt: skip
        assert turn("sql").usage.prompt_tokens_details.cached_tokens > 0
        # another adapter's KV is not this one's (nothing ran with it yet: not even the template's head)
        assert turn("poet").usage.prompt_tokens_details.cached_tokens == 0
        gone = httpx.delete(f"{server.url}/v1/sessions/u", params={"model": "sql"}, timeout=30)
        assert gone.status_code == 200
        again = httpx.delete(f"{server.url}/v1/sessions/u", params={"model": "sql"}, timeout=30)
        assert again.status_code == 404
        assert httpx.delete(f"{server.url}/v1/sessions/u", params={"model": "poet"}, timeout=30).status_code == 200
        scraped = httpx.get(f"{server.url}/metrics", timeout=30).text  # vLLM's gauge of the adapters in use
        assert 'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in scraped
        cards = {m.id: m for m in c.models.list().data}
        assert cards["sql"].parent == cards["poet"].parent != "sql" and cards["sql"].root == str(adapters / "sql")
        messages = [{"role": "user", "content": "Tell me about the sea."}]
        ref = LLM(str(chat_model_dir), enable_lora=True)
        params = SamplingParams(max_tokens=8, temperature=0)
        answers = {}
        for name in ("sql", "poet"):
            got = c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
            want = ref.chat(messages, params, lora_request=LoRARequest(name, 1, str(adapters / name)))[0]
            assert got.model == name and got.choices[0].message.content == want.text
            answers[name] = want.text
        base = c.chat.completions.create(model=cards["sql"].parent, messages=messages, max_tokens=8, temperature=0)
        assert base.choices[0].message.content == ref.chat(messages, params)[0].text != answers["sql"]
        with pytest.raises(Exception, match="'sql' or 'poet'"):
            c.chat.completions.create(model="nope", messages=messages, max_tokens=4)
        completion = c.completions.create(model="poet", prompt="Once upon", max_tokens=5, temperature=0)
        assert completion.model == "poet"
        assert completion.choices[0].text == ref.generate(["Once upon"], SamplingParams(max_tokens=5, temperature=0),
                                                          lora_request=LoRARequest("poet", 1, str(adapters / "poet")),
                                                          use_tqdm=False)[0].text  # fmt: skip
    finally:
        server.stop()


def test_lora_modules_that_cannot_be_served_stop_the_start(chat_model_dir, adapters, tmp_path):
    from cachedattention.server.app import create_app

    with pytest.raises(ValueError, match="--enable-lora"):
        create_app(EngineConfig(model=str(chat_model_dir)), lora_modules=[("sql", str(adapters / "sql"))])
    with pytest.raises(ValueError, match="is not a folder"):
        create_app(lora_config(chat_model_dir), lora_modules=[("x", str(tmp_path / "missing"))])
    with pytest.raises(ValueError, match="a name of its own"):
        create_app(lora_config(chat_model_dir), lora_modules=[("a", str(adapters / "sql")), ("a", str(adapters / "poet"))])


def test_lora_module_flags_read_as_vllm_s():
    assert lora_module("sql=/adapters/sql") == ("sql", "/adapters/sql")
    assert lora_module('{"name": "sql", "path": "/a", "base_model_name": "m"}') == ("sql", "/a")
    for bad in ("sql", "=/a", '{"name": "sql"}', '{"name": "s", "path": "/a", "extra": 1}', "{"):
        with pytest.raises(argparse.ArgumentTypeError):
            lora_module(bad)


def test_lora_modules_without_enable_lora_is_refused_before_loading(chat_model_dir, capsys):
    from cachedattention.cli import main

    assert main(["serve", str(chat_model_dir), "--lora-modules", "sql=/nowhere", "--port", "0"]) == 2
    assert "--lora-modules needs --enable-lora" in capsys.readouterr().err


def test_adapters_added_and_taken_away_at_run_time(chat_model_dir, adapters, tmp_path, monkeypatch):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, opened by its variable."""
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    server = start_server(lora_config(chat_model_dir))
    try:
        c = client(server.url)
        messages = [{"role": "user", "content": "Tell me about the sea."}]

        def post(route, body):
            return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60)

        loaded = post("load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters / "sql")})
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'sql' added successfully."
        assert "sql" in {m.id for m in c.models.list().data}
        first = c.chat.completions.create(model="sql", messages=messages, max_tokens=6, temperature=0)
        again = post("load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters / "poet")})
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        c.chat.completions.create(model="sql", messages=messages, max_tokens=6, temperature=0,
                                  extra_body={"session_id": "s1"})  # fmt: skip
        # in place: the name now runs the other adapter's files
        assert post("load_lora_adapter", {"lora_name": "sql", "lora_path": str(adapters / "poet"),
                                          "load_inplace": True}).status_code == 200  # fmt: skip
        replaced = c.chat.completions.create(model="sql", messages=messages, max_tokens=6, temperature=0,
                                             extra_body={"session_id": "s2"})  # fmt: skip
        assert replaced.choices[0].message.content != first.choices[0].message.content
        # a session kept with the files the name had before is still the name's to forget
        assert httpx.delete(f"{server.url}/v1/sessions/s1", params={"model": "sql"}, timeout=30).status_code == 200
        broken = post("load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path / "missing")})
        assert broken.status_code == 400 and "is not a folder" in broken.json()["error"]["message"]
        assert post("load_lora_adapter", {"lora_name": "x"}).status_code == 400
        gone = post("unload_lora_adapter", {"lora_name": "sql"})
        assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'sql' removed successfully."
        assert post("unload_lora_adapter", {"lora_name": "sql"}).status_code == 404
        # and once the name is taken away
        assert httpx.delete(f"{server.url}/v1/sessions/s2", params={"model": "sql"}, timeout=30).status_code == 200
        with pytest.raises(Exception, match="does not exist"):
            c.chat.completions.create(model="sql", messages=messages, max_tokens=4)
    finally:
        server.stop()
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING")
    closed = start_server(lora_config(chat_model_dir))  # without the variable: no such routes, as vLLM
    try:
        assert httpx.post(f"{closed.url}/v1/load_lora_adapter", json={}, timeout=30).status_code == 404
    finally:
        closed.stop()


def test_the_router_adds_and_takes_away_an_adapter_on_every_replica(chat_model_dir, adapters, tmp_path, monkeypatch):
    """Any replica may serve a conversation's next turn: the runtime LoRA routes reach them all."""
    from cachedattention.router.app import create_router_app
    from cachedattention.router.replicas import RouterConfig
    from tests.server.conftest import serve_app

    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    replicas = [start_server(lora_config(chat_model_dir)) for _ in range(2)]
    router = serve_app(create_router_app(RouterConfig(tuple(r.url for r in replicas), max_body_bytes=1 << 20)))
    try:
        def models(url):
            return {m.id for m in client(url).models.list().data}

        loaded = httpx.post(f"{router.url}/v1/load_lora_adapter", timeout=60,
                            json={"lora_name": "sql", "lora_path": str(adapters / "sql")})  # fmt: skip
        assert loaded.status_code == 200 and all("sql" in models(r.url) for r in replicas)
        refused = httpx.post(f"{router.url}/v1/load_lora_adapter", timeout=60,
                             json={"lora_name": "x", "lora_path": str(tmp_path / "missing")})  # fmt: skip
        assert refused.status_code == 400 and "is not a folder" in refused.json()["error"]["message"]
        gone = httpx.post(f"{router.url}/v1/unload_lora_adapter", json={"lora_name": "sql"}, timeout=60)
        assert gone.status_code == 200 and not any("sql" in models(r.url) for r in replicas)
    finally:
        router.stop()
        for r in replicas:
            r.stop()


def test_an_adapter_not_loaded_is_read_off_the_engine_s_thread(chat_model_dir, adapters):
    """Past --max-cpu-loras an adapter is read again when asked for: in a worker thread, not on the
    engine's (whose every stream would wait for the files)."""
    import threading

    one_kept = EngineConfig(model=str(chat_model_dir), cache=CacheConfig(num_pages=PAGES), lora=LoRAConfig(enable=True))
    server = start_server(one_kept, lora_modules=[("sql", str(adapters / "sql")), ("poet", str(adapters / "poet"))])
    try:
        registry = server.app.state.engine_loop.engine.loras
        readers = []
        real = registry.read
        registry.read = lambda request: readers.append(threading.current_thread().name) or real(request)
        c = client(server.url)
        for name in ("sql", "poet", "sql"):  # (one kept loaded: each read again here)
            c.completions.create(model=name, prompt="Once upon", max_tokens=2, temperature=0)
        assert readers and "engine-loop" not in readers
    finally:
        server.stop()
