"""The command line: `chat` on the embedded model (stdin until /exit) and `generate`."""

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_chat_prints_each_turn_with_ttft_and_reuse(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cachedattention.cli", "chat", "--max-tokens", "8", "--store-dir", str(tmp_path)],
        input="Name three colors.\nAnd one more?\n/exit\n", capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[TTFT")]
    assert len(lines) == 2
    assert "reused 0 (none)" in lines[0]
    assert "host" in lines[1] and "reused 0 " not in lines[1]  # turn 2 reused turn 1's KV from host


@pytest.mark.slow
def test_generate_and_bad_model_path():
    ok = subprocess.run([sys.executable, "-m", "cachedattention.cli", "generate", "--prompt", "Hi", "--chat",
                         "--max-tokens", "4", "--no-store"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout.strip() and "TTFT" in ok.stderr
    # (as `python -m cachedattention`, the package's own entry; named before torch loads: -X importtime lists it)
    bad = subprocess.run([sys.executable, "-X", "importtime", "-m", "cachedattention", "generate", "/no/such/model",
                          "--prompt", "x"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "error: model path '/no/such/model' does not exist" in bad.stderr
    assert "| cachedattention.cli" in bad.stderr and not re.search(r"\| +torch$", bad.stderr, re.M)
    tok = subprocess.run([sys.executable, "-m", "cachedattention", "serve", "--tokenizer", "/no/tok"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert tok.returncode == 2 and "error: tokenizer path '/no/tok' does not exist" in tok.stderr


@pytest.mark.slow
def test_the_router_and_the_parser_start_without_torch():
    """A router process relays HTTP: it never loads torch or the engine (seconds and hundreds of MB
    per process), nor does `--help` or a usage error."""
    script = (
        "import sys\n"
        "from cachedattention.cli import build_parser\n"
        "from cachedattention.router.app import create_router_app\n"
        "from cachedattention.router.replicas import RouterConfig\n"
        "import cachedattention\n"
        "args = build_parser().parse_args(['router', '--replica', 'http://127.0.0.1:9'])\n"
        "create_router_app(RouterConfig(tuple(args.replica)))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'cachedattention.llm') if m in sys.modules)\n"
        "print(heavy)\n"
        "from cachedattention import LLM, SamplingParams\n"  # (the package's names, loaded on first use)
        "print(LLM.__module__, SamplingParams.__module__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:2] == ["[]", "cachedattention.llm cachedattention.sampling"]


@pytest.mark.slow
def test_the_lazy_package_still_reaches_its_submodules_after_a_plain_import():
    """`import cachedattention` then `cachedattention.config...`, as when the package imported its
    submodules eagerly; nothing is imported for a name that is neither."""
    script = (
        "import cachedattention, sys\n"
        "print(cachedattention.config.MAX_LOGPROBS, 'torch' in sys.modules)\n"
        "print(cachedattention.sampling.SamplingParams is cachedattention.SamplingParams)\n"
        "print(hasattr(cachedattention, 'no_such_name'), hasattr(cachedattention, '__main__'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[:3] == ["20 False", "True", "False False"]


def test_store_flags_reach_the_engine_config():
    from cachedattention.cli import build_parser, engine_config

    args = build_parser().parse_args([
        "serve", "--store-dir", "/tmp/kv", "--no-preload", "--prefetch-window", "3", "--host-free-threshold", "0.1",
        "--disk-ttl-s", "60", "--policy", "lru", "--windowed-history", "keep",
    ])
    store = engine_config(args).store
    assert (store.preload, store.prefetch_window, store.host_free_threshold, store.disk_ttl_s, store.policy,
            store.windowed_history) == (False, 3, 0.1, 60.0, "lru", "keep")  # fmt: skip
    defaults = engine_config(build_parser().parse_args(["serve"])).store
    assert defaults.preload and defaults.prefetch_window is None and defaults.disk_ttl_s is None
    assert defaults.windowed_history == "disk"
    with pytest.raises(ValueError, match="disk_ttl_s"):
        engine_config(build_parser().parse_args(["serve", "--disk-ttl-s", "0"]))
    with pytest.raises(ValueError, match="host_free_threshold"):
        engine_config(build_parser().parse_args(["serve", "--host-free-threshold", "1.5"]))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.slow
def test_a_cuda_benchmark_without_cuda_says_so_before_building_a_model():
    proc = subprocess.run([sys.executable, "-m", "cachedattention.cli", "bench", "--mode", "turn", "--device", "cuda",
                           "--random-shape", "llama3-8b"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_sampling_flags_reach_sampling_params_over_the_generation_config():
    from types import SimpleNamespace

    from cachedattention.cli import build_parser
    from cachedattention.terminal import sampling_params

    def llm(**defaults):  # (the engine's sampling defaults: the model's generation config, and overrides)
        return SimpleNamespace(engine=SimpleNamespace(sampling_defaults=defaults))

    args = build_parser().parse_args(["generate", "--prompt", "x", "--temperature", "0.7", "--top-p", "0.9",
                                      "--top-k", "40", "--seed", "3", "--repetition-penalty", "1.2",
                                      "--presence-penalty", "0.5", "--frequency-penalty", "0.25"])  # fmt: skip
    p = sampling_params(args, llm(temperature=0.2, top_p=0.5, max_tokens=7))
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
            p.max_tokens) == (0.7, 0.9, 40, 3, 1.2, 0.5, 0.25, 7)  # fmt: skip
    chat = build_parser().parse_args(["chat"])
    assert sampling_params(chat, llm()).greedy and sampling_params(chat, llm()).max_tokens == 128  # greedy unless asked
    model = sampling_params(chat, llm(temperature=0.6, top_k=20))  # the model's own (Qwen3's, say), as vLLM's
    assert (model.temperature, model.top_k, model.max_tokens) == (0.6, 20, 128)
    with pytest.raises(ValueError, match="repetition_penalty"):
        sampling_params(build_parser().parse_args(["chat", "--repetition-penalty", "0"]), llm())


def test_ctrl_c_while_the_model_loads_ends_quietly_with_130(monkeypatch, capsys):
    """Ctrl-C while a command loaded its model printed a KeyboardInterrupt traceback from deep inside
    transformers' imports."""
    from cachedattention import terminal
    from cachedattention.cli import main

    def loading(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(terminal, "run_generate", loading)
    assert main(["generate", "--prompt", "hi"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_first_run_says_that_it_converts_the_embedded_model(tmp_path, monkeypatch, capsys):
    """The first use of the embedded model converts it (half a minute on 2 cores): the terminal
    commands say so before that silence; later runs, and other models, say nothing."""
    from cachedattention import terminal
    from cachedattention.cli import build_parser
    from cachedattention.model import embedded

    embedded.embedded_model_dir()  # (the test session's cache home holds it converted)
    assert embedded.embedded_model_converted()
    monkeypatch.setattr(terminal.LLM, "from_config", lambda config: config)  # (not the conversion itself)
    for argv in (["demo"], ["generate", "--prompt", "hi", "some/model"]):
        terminal._llm(build_parser().parse_args(argv))
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path))  # a fresh machine's
    assert not embedded.embedded_model_converted()
    terminal._llm(build_parser().parse_args(["demo"]))
    assert "converting the embedded model" in capsys.readouterr().err
    terminal._llm(build_parser().parse_args(["generate", "--prompt", "hi", "some/model"]))
    assert capsys.readouterr().err == ""


def test_generate_honours_the_generation_config_override(chat_model_dir, capsys):
    """--override-generation-config was accepted by generate and chat, and ignored."""
    from cachedattention.cli import main

    def text(*flags: str) -> str:
        assert main(["generate", str(chat_model_dir), "--prompt", "Hello", *flags]) == 0
        return capsys.readouterr().out

    three, five = text("--max-tokens", "3"), text("--max-tokens", "5")
    assert three != five
    assert text("--override-generation-config", '{"max_new_tokens": 3}') == three
    assert text("--override-generation-config", '{"max_new_tokens": 3}', "--max-tokens", "5") == five  # a flag wins


def test_a_chat_turn_that_fails_or_is_stopped_is_left_out_and_the_chat_goes_on(chat_model_dir, monkeypatch, capsys):
    """One Ctrl-C during an answer, a line the tokenizer refuses, or a line that is not text ended the
    whole chat (a traceback, or an error and exit) and lost the conversation."""
    import builtins

    from cachedattention.cli import main
    from cachedattention.llm import LLM

    lines = iter(["Hello", "Stop this one", "bad \ud800 text", UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid"),
                  "And now?", KeyboardInterrupt()])  # fmt: skip

    def typed(prompt=""):
        line = next(lines)
        if isinstance(line, BaseException):
            raise line
        return line

    chat, asked = LLM.chat, []

    def stopped_once(self, messages, *a, **kw):
        asked.append([m["content"] for m in messages])
        if messages[-1]["content"] == "Stop this one":
            raise KeyboardInterrupt  # (Ctrl-C during the answer)
        return chat(self, messages, *a, **kw)

    monkeypatch.setattr(builtins, "input", typed)
    monkeypatch.setattr(LLM, "chat", stopped_once)
    assert main(["chat", str(chat_model_dir), "--max-tokens", "3"]) == 0  # (Ctrl-C at the prompt: the end)
    out = capsys.readouterr()
    assert out.out.count("bot> ") == 2
    assert "[answer stopped" in out.err and "lone surrogate" in out.err and "not valid text" in out.err
    assert len(asked[-1]) == 3 and asked[-1][0] == "Hello" and asked[-1][2] == "And now?"  # the others left out


@pytest.mark.slow
def test_the_demo_plays_every_turn_and_removes_its_own_store(chat_model_dir, tmp_path, monkeypatch, capsys):
    import tempfile

    from cachedattention.cli import main

    path = chat_model_dir
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the demo makes its store
    assert main(["demo", str(path), "--max-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("same tokens as recompute") == 4 and "DIFFERENT" not in out
    assert list(scratch.iterdir()) == []
    kept = tmp_path / "kept"
    assert main(["demo", str(path), "--max-tokens", "3", "--store-dir", str(kept)]) == 0
    assert any(kept.iterdir())  # a store the user named is theirs to keep
    capsys.readouterr()
    # a window too small for the conversation: the store truncates it, and recompute runs what it kept
    assert main(["demo", str(path), "--max-tokens", "8", "--max-model-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "truncated" in out and "DIFFERENT" not in out
    assert out.count("same tokens as recompute") + out.count("as truncation may give") == 4


@pytest.mark.parametrize("argv, says", [
    (["bench", "--repeats", "0"], "--repeats: an integer >= 1 was expected, got 0"),
    (["bench", "--mode", "policy", "--sessions", "0"], "--sessions: an integer >= 1"),
    (["bench", "--history", "abc"], "--history: an integer >= 1 was expected, got 'abc'"),
    (["bench", "--history", "32,0"], "--history: an integer >= 1 was expected, got 0"),
    (["bench", "--new-tokens", "-20"], "--new-tokens: an integer >= 1"),
    (["bench", "--max-answer-tokens", "0"], "--max-answer-tokens: an integer >= 1"),
    (["bench", "--session-rate", "-1"], "--session-rate: a finite number > 0"),
    (["bench", "--think-time", "inf"], "--think-time: a finite number >= 0 was expected, got inf"),
    (["bench", "--replicas", "1"], "--replicas: an integer >= 2"),
    (["serve", "--port", "70000"], r"--port: a port in \[0, 65535\] was expected, got 70000"),
    (["serve", "--max-body-bytes", "-1"], "--max-body-bytes: an integer >= 1"),
    (["serve", "--shutdown-grace-s", "-1"], "--shutdown-grace-s: a finite number >= 0"),
    (["serve", "--shutdown-grace-s", "inf"], "--shutdown-grace-s: a finite number >= 0"),
    (["serve", "--body-timeout-s", "nan"], "--body-timeout-s: a finite number > 0"),
])  # fmt: skip
def test_numeric_flags_out_of_range_are_usage_errors_before_any_model_loads(argv, says, capsys):
    """Found by fuzzing: these failed after the model loaded (a traceback for the port, 'no median for
    empty data' for no repeats), were taken as the default (no sessions: 1500) or were taken as they
    came (a negative body limit refused every request)."""
    from cachedattention.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert re.search(says, capsys.readouterr().err)


@pytest.mark.parametrize("argv, says", [
    (["generate", "--prompt", "hi", "--max-tokens", "-3"], "max_tokens must be a positive integer, got -3"),
    (["chat", "--top-p", "2"], r"top_p must be a number in \(0, 1\], got 2.0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "temperature must be a number >= 0, got nan"),
    (["demo", "--max-tokens", "0"], "--max-tokens: an integer >= 1 was expected, got 0"),
    # found by the input audit: these failed every chat turn after the model loaded, the chat going on
    (["chat", "--session-id", ""], "--session-id: a non-empty name was expected"),
    (["chat", "--system", "\udcff"], "--system: the text is not valid UTF-8"),  # (argv bytes that are not UTF-8)
    (["generate", "--prompt", "\udcff"], "--prompt: the text is not valid UTF-8"),
])  # fmt: skip
def test_sampling_flags_out_of_range_are_usage_errors_before_any_model_loads(argv, says, capsys, monkeypatch):
    from cachedattention import terminal
    from cachedattention.cli import main

    monkeypatch.setattr(terminal, "_llm", lambda args: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert re.search(says, capsys.readouterr().err)


def test_a_bench_json_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys):
    from cachedattention.cli import main

    (tmp_path / "file").write_text("")
    for path, says in ((tmp_path, "is a directory"), (tmp_path / "file" / "x.json", "cannot be written")):
        assert main(["bench", "--mode", "policy", "--quick", "--json", str(path)]) == 2
        assert says in capsys.readouterr().err


def test_the_quick_workload_takes_the_shape_flags_given():
    from cachedattention.bench.workload_bench import build_workload
    from cachedattention.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--sessions", "6", "--max-answer-tokens", "2",
                                      "--think-time", "0"])  # fmt: skip
    workload = build_workload(args, None)
    answers = [t.answer_tokens for s in workload.sessions for t in s.turns]
    assert len(workload.sessions) == 6 and max(answers) <= 2 and len(answers) > 6
    default = build_workload(build_parser().parse_args(["bench", "--quick", "--sessions", "6"]), None)
    assert max(t.answer_tokens for s in default.sessions for t in s.turns) > 2  # (the flag made the difference)


def test_chat_commands_reset_the_conversation_and_are_never_sent_to_the_model(chat_model_dir, monkeypatch, capsys):
    import builtins

    from cachedattention.cli import main
    from cachedattention.llm import LLM

    lines = iter(["Hello", "/help", "/no_think", "/reset", "Again", "/quit", "never read"])
    chat, asked = LLM.chat, []

    def seen(self, messages, *a, **kw):
        asked.append([m["content"] for m in messages])
        return chat(self, messages, *a, **kw)

    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    monkeypatch.setattr(LLM, "chat", seen)
    assert main(["chat", str(chat_model_dir), "--max-tokens", "2", "--system", "Be brief."]) == 0
    # (any other line is a message: Qwen3's /no_think is one); /reset: a new conversation, its system prompt kept
    assert asked == [["Be brief.", "Hello"], ["Be brief.", "Hello", asked[1][2], "/no_think"], ["Be brief.", "Again"]]
    err = capsys.readouterr().err
    assert "/reset starts a new conversation" in err and "[a new conversation]" in err
    assert next(lines) == "never read"


def test_a_chat_turn_that_fails_in_the_engine_is_left_out_and_a_second_ctrl_c_ends_the_chat(chat_model_dir,
                                                                                              monkeypatch, capsys):
    """A turn the engine failed alone (finish reason error) was kept as if answered; a second Ctrl-C,
    which stops a step midway, let the chat go on with an engine it may have left half updated."""
    import builtins

    from cachedattention.cli import main
    from cachedattention.interrupts import StepInterrupted
    from cachedattention.llm import LLM

    lines = iter(["Hello", "Fails", "Again", "Now!", "never read"])
    chat, asked = LLM.chat, []

    def engine_fails(self, messages, *a, **kw):
        asked.append([m["content"] for m in messages])
        if messages[-1]["content"] == "Now!":
            raise StepInterrupted
        outs = chat(self, messages, *a, **kw)
        if messages[-1]["content"] == "Fails":
            outs[0].finish_reason = "error"
        return outs

    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    monkeypatch.setattr(LLM, "chat", engine_fails)
    assert main(["chat", str(chat_model_dir), "--max-tokens", "2"]) == 0
    assert [a[-1] for a in asked] == ["Hello", "Fails", "Again", "Now!"] and len(asked[2]) == 3  # "Fails" left out
    err = capsys.readouterr().err
    assert "the answer failed" in err and "the chat ends" in err
    assert next(lines) == "never read"
