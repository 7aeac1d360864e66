"""The command line: `chat` on the embedded model (stdin until /exit) and `generate`."""

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
    bad = subprocess.run([sys.executable, "-m", "cachedattention.cli", "generate", "/no/such/model", "--prompt", "x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_store_flags_reach_the_engine_config():
    from cachedattention.cli import build_parser, engine_config

    args = build_parser().parse_args([
        "serve", "--store-dir", "/tmp/kv", "--no-preload", "--prefetch-window", "3", "--host-free-threshold", "0.1",
        "--disk-ttl-s", "60", "--policy", "lru",
    ])
    store = engine_config(args).store
    assert (store.preload, store.prefetch_window, store.host_free_threshold, store.disk_ttl_s, store.policy) == (
        False, 3, 0.1, 60.0, "lru")
    defaults = engine_config(build_parser().parse_args(["serve"])).store
    assert defaults.preload and defaults.prefetch_window is None and defaults.disk_ttl_s is None
    with pytest.raises(ValueError, match="disk_ttl_s"):
        engine_config(build_parser().parse_args(["serve", "--disk-ttl-s", "0"]))
    with pytest.raises(ValueError, match="host_free_threshold"):
        engine_config(build_parser().parse_args(["serve", "--host-free-threshold", "1.5"]))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_cuda_benchmark_without_cuda_says_so_before_building_a_model():
    proc = subprocess.run([sys.executable, "-m", "cachedattention.cli", "bench", "--mode", "turn", "--device", "cuda",
                           "--random-shape", "llama3-8b"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "sees no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_sampling_flags_reach_sampling_params():
    from cachedattention.cli import build_parser
    from cachedattention.terminal import sampling_params

    args = build_parser().parse_args(["generate", "--prompt", "x", "--temperature", "0.7", "--top-p", "0.9",
                                      "--top-k", "40", "--seed", "3", "--repetition-penalty", "1.2",
                                      "--presence-penalty", "0.5", "--frequency-penalty", "0.25"])  # fmt: skip
    p = sampling_params(args)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (
        0.7, 0.9, 40, 3, 1.2, 0.5, 0.25)
    assert sampling_params(build_parser().parse_args(["chat"])).greedy  # greedy unless asked
    with pytest.raises(ValueError, match="repetition_penalty"):
        sampling_params(build_parser().parse_args(["chat", "--repetition-penalty", "0"]))


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
