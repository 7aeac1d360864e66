"""`cachedattention bench --mode workload` end to end on a tiny random model with the embedded tokenizer."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from cachedattention.bench.replay import clamp_tiers, fit_prompt
from cachedattention.bench.systems import SYSTEM_NAMES, Budgets, build_systems, parse_system_names
from cachedattention.bench.workload import Session, Turn, Workload
from cachedattention.cli import main

WORKLOAD = Workload(
    sessions=(
        Session("a", 0.0, (Turn(6, 4, 0.0), Turn(5, 3, 0.0), Turn(7, 4, 0.02))),
        Session("b", 0.01, (Turn(4, 5, 0.0), Turn(6, 2, 0.01))),
        Session("c", 0.02, (Turn(8, 3, 0.0), Turn(3, 4, 0.0), Turn(5, 3, 0.0))),
    ),
    seed=7,
    source="test",
)


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory) -> Path:
    import torch
    import transformers

    from cachedattention.model.embedded import embedded_model_dir

    d = tmp_path_factory.mktemp("tiny-chat-bench")
    tok = transformers.AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    tok.save_pretrained(d)
    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(d)
    return d


def _bench(capsys, model: Path | None, workload: Path, out: Path, *extra: str) -> tuple[str, dict]:
    js = out / "result.json"
    argv = ["bench", "--mode", "workload", "--workload", str(workload), "--out", str(out), "--json", str(js), *extra]
    if model is not None:
        argv += ["--model", str(model)]
    assert main(argv) == 0
    return capsys.readouterr().out, json.loads(js.read_text())


@pytest.fixture(scope="module")
def run(tiny_chat_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-out")
    wl = out / "input.json"
    WORKLOAD.to_json(wl)
    buf = io.StringIO()  # capsys is function-scoped; a module fixture captures stdout by hand
    js = out / "result.json"
    argv = ["bench", "--mode", "workload", "--model", str(tiny_chat_dir), "--workload", str(wl), "--out", str(out),
            "--json", str(js), "--systems", "RE,CachedAttention"]  # fmt: skip
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return {"stdout": buf.getvalue(), "json": json.loads(js.read_text()), "out": out}


def test_every_output_is_produced(run):
    text, data, out = run["stdout"], run["json"], run["out"]
    assert "| RE |" in text and "| CachedAttention |" in text and "cost_usd =" in text
    assert "spent waiting to be admitted" in text
    assert set(data["systems"]) == {"RE", "CachedAttention"}
    for name in ("RE", "CachedAttention"):
        s = data["systems"][name]
        assert s["ttft_p50_s"] > 0 and s["num_turns"] == WORKLOAD.num_turns and s["cost_usd"] > 0
    assert data["workload"]["num_turns"] == WORKLOAD.num_turns
    assert data["config"]["systems"]["CachedAttention"]["disk_bytes"] > 0
    assert data["config"]["systems"]["RE"]["host_bytes"] == 0
    for png in ("ttft_by_turn.png", "hit_rate_by_tier.png", "cost.png"):
        assert (out / png).stat().st_size > 1000


def test_numbers_are_consistent(run):
    data = run["json"]
    answers = {(s.session_id, i): t.answer_tokens for s in WORKLOAD.sessions for i, t in enumerate(s.turns)}
    for name, records in data["records"].items():
        assert len(records) == WORKLOAD.num_turns
        for r in records:
            cached = sum(r["cached_tokens"].values())
            computed = r["prompt_tokens"] - cached
            assert computed >= 1 and cached + computed == r["prompt_tokens"]
            assert r["generated_tokens"] == answers[(r["session_id"], r["turn_index"])]
            if name == "CachedAttention" and r["turn_index"] >= 1:
                assert cached > 0, r
            assert 0 <= r["queue_s"] <= r["ttft_s"]  # in-process: the wait to be admitted is known
        s = data["systems"][name]
        assert sum(s["hit_rate_by_tier"].values()) == pytest.approx(s["hit_rate"])
        assert s["generated_tokens"] == WORKLOAD.total_answer_tokens
    assert data["systems"]["RE"]["hit_rate"] == 0
    assert data["systems"]["CachedAttention"]["hit_rate"] > 0


def test_saved_workload_replays_the_same(run, tiny_chat_dir, tmp_path, capsys):
    saved = run["out"] / "workload.json"
    assert Workload.from_json(saved) == WORKLOAD
    _, again = _bench(capsys, tiny_chat_dir, saved, tmp_path, "--systems", "RE")
    first = {(r["session_id"], r["turn_index"]): r for r in run["json"]["records"]["RE"]}
    for r in again["records"]["RE"]:
        ref = first[(r["session_id"], r["turn_index"])]
        assert r["generated_tokens"] == ref["generated_tokens"]
        if r["turn_index"] == 0:  # later prompts hold the model's answers, which batching may perturb
            assert r["prompt_tokens"] == ref["prompt_tokens"]


def test_system_names_and_budgets(tmp_path):
    assert parse_system_names(None) == SYSTEM_NAMES
    assert parse_system_names("cachedattention, re") == ("RE", "CachedAttention")
    with pytest.raises(ValueError, match="choose from"):
        parse_system_names("RE,vllm")
    budgets = Budgets.for_workload(1000, 100)
    assert budgets.device_bytes < 1000 and budgets.host_bytes < 1000 < budgets.disk_bytes
    systems = {s.name: s for s in build_systems(SYSTEM_NAMES, budgets, tmp_path)}
    assert not systems["RE"].cache.enable_prefix_cache and not systems["RE"].store.enable
    assert systems["device+host"].store.store_dir is None and systems["lru"].store.policy == "lru"
    assert systems["CachedAttention"].billed_disk_bytes == budgets.disk_bytes


def test_bad_arguments_are_value_errors(tiny_chat_dir, tmp_path, capsys):
    argv = ["bench", "--mode", "workload", "--model", str(tiny_chat_dir), "--out", str(tmp_path)]
    assert main([*argv, "--systems", "nope"]) == 2
    assert main([*argv, "--time-scale", "0"]) == 2
    assert main([*argv, "--workload", str(tmp_path / "missing.json")]) == 2
    assert "error:" in capsys.readouterr().err


def test_fit_prompt_and_clamp(tiny_chat_dir):
    from cachedattention.model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(str(tiny_chat_dir))
    msgs = []
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": "answer " * 10}]
    msgs.append({"role": "user", "content": "last question"})
    full = tok.encode_chat(msgs)
    ids, kept = fit_prompt(tok, msgs, len(full) // 2, drop_history=True)
    assert len(ids) <= len(full) // 2 and kept[-1] == msgs[-1] and kept[0]["content"] != msgs[0]["content"]
    ids, kept = fit_prompt(tok, msgs, len(full), drop_history=True)
    assert kept == msgs and ids == full
    assert clamp_tiers({"device": 5, "host": 9}, 10) == {"device": 5, "host": 5, "disk": 0, "remote": 0}


def _free_port_server(model_dir: Path):
    import uvicorn

    from cachedattention.config import EngineConfig
    from cachedattention.server.app import create_app

    app = create_app(EngineConfig(model=str(model_dir)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.skipif(
    importlib.util.find_spec("cachedattention.server.app") is None or importlib.util.find_spec("openai") is None,
    reason="needs cachedattention.server.app and the openai client",
)
@pytest.mark.slow
def test_http_replay_against_a_real_server(tiny_chat_dir, tmp_path, capsys):
    server, thread, url = _free_port_server(tiny_chat_dir)
    try:
        wl = tmp_path / "w.json"
        WORKLOAD.to_json(wl)
        text, data = _bench(capsys, None, wl, tmp_path, "--url", url)
        _, kept = _bench(capsys, None, wl, tmp_path / "responses", "--url", url, "--api", "responses")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    # the Responses API sends each turn's new message only; the server's conversation is the same one
    by_turn = {(r["session_id"], r["turn_index"]): r["prompt_tokens"] for r in data["records"][url]}
    kept_records = kept["records"][f"{url} (responses)"]
    assert {(r["session_id"], r["turn_index"]): r["prompt_tokens"] for r in kept_records} == by_turn
    assert kept["config"]["api"] == "responses" and sum(sum(r["cached_tokens"].values()) for r in kept_records) > 0
    assert list(data["systems"]) == [url] and f"| {url} |" in text
    records = data["records"][url]
    assert len(records) == WORKLOAD.num_turns and data["config"]["systems"][url]["failed_turns"] == 0
    answers = {(s.session_id, i): t.answer_tokens for s in WORKLOAD.sessions for i, t in enumerate(s.turns)}
    for r in records:
        assert r["generated_tokens"] == answers[(r["session_id"], r["turn_index"])]
        assert sum(r["cached_tokens"].values()) < r["prompt_tokens"]
    assert data["systems"][url]["hit_rate"] > 0  # the server's device prefix cache serves later turns


@pytest.mark.slow
def test_replicas_share_sessions_through_the_remote_tier(tiny_chat_dir, tmp_path, capsys):
    """Two replicas behind a load balancer that does not keep conversations on one replica: alone, a
    replica misses what the other served; with the remote tier, every later turn reuses its history."""
    from tests.redis_server import RedisServer

    wl = tmp_path / "input.json"
    # users think for a while: a replica's publish (a background save, encode and SET) lands before
    # the session's next turn arrives, with room for a loaded machine
    thinking = [Session(s.session_id, s.arrival_s, tuple(Turn(t.user_tokens, t.answer_tokens, 1.5) for t in s.turns))
                for s in WORKLOAD.sessions]
    Workload(sessions=tuple(thinking), seed=7, source="test").to_json(wl)
    redis = RedisServer(tmp_path)
    try:
        _, data = _bench(capsys, tiny_chat_dir, wl, tmp_path / "out", "--systems", "replicas,replicas+remote",
                         "--replicas", "2", "--remote-url", redis.url)
        assert redis.client().dbsize() == 0  # the run's keys are gone once its footprint is billed
    finally:
        redis.stop()
    config = data["config"]["systems"]
    assert config["replicas"]["replicas"] == 2 and len(config["replicas"]["engine_stats"]["replicas"]) == 2
    shared = config["replicas+remote"]["remote_bytes"]
    assert shared > 0 and config["replicas+remote"]["host_bytes"] == 2 * data["config"]["budgets"]["host_bytes"] + shared
    moved = 0
    for name, records in data["records"].items():
        for r in records:
            if name == "replicas+remote" and r["turn_index"]:  # whichever replica served the turn before
                assert sum(r["cached_tokens"].values()) > 0, r
            moved += name == "replicas+remote" and r["cached_tokens"]["remote"] > 0
    assert moved > 0  # some turns did land on the other replica
    remote, alone = data["systems"]["replicas+remote"], data["systems"]["replicas"]
    assert remote["hit_rate"] > alone["hit_rate"] and alone["hit_rate_by_tier"]["remote"] == 0


def test_the_router_s_placement_keeps_each_session_on_one_replica(tiny_chat_dir, tmp_path, capsys):
    """replicas+router places turns as `cachedattention router` does: every later turn finds its
    history on its session's replica, where per-turn random placement often misses it."""
    wl = tmp_path / "input.json"
    WORKLOAD.to_json(wl)
    _, data = _bench(capsys, tiny_chat_dir, wl, tmp_path / "out", "--systems", "replicas,replicas+router")
    routed = data["records"]["replicas+router"]
    assert len(routed) == WORKLOAD.num_turns
    assert all(sum(r["cached_tokens"].values()) > 0 for r in routed if r["turn_index"])
    assert data["config"]["systems"]["replicas+router"]["replicas"] == 2
    assert data["systems"]["replicas+router"]["hit_rate"] > data["systems"]["replicas"]["hit_rate"]


def test_replica_systems_need_their_arguments(tmp_path):
    budgets = Budgets.for_workload(1000, 100)
    with pytest.raises(ValueError, match="--remote-url"):
        build_systems(("replicas+remote",), budgets, tmp_path)
    with pytest.raises(ValueError, match="--remote-url"):
        build_systems(("replicas+router+remote",), budgets, tmp_path)
    with pytest.raises(ValueError, match="--replicas"):
        build_systems(("replicas",), budgets, tmp_path, replicas=1)
    routed = build_systems(("replicas", "replicas+router", "replicas+router+remote"), budgets, tmp_path, remote_url="unix:///x")
    assert [s.routing for s in routed] == ["random", "affinity", "affinity"] and routed[2].store.remote_url
    assert parse_system_names("replicas, RE") == ("RE", "replicas")
