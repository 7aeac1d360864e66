"""A Hugging Face model id (vLLM's `vllm serve ORG/NAME` with HF_HUB_OFFLINE=1) read from the local
hub cache: a fake cache in the hub's layout (models--ORG--NAME/refs/BRANCH holding a commit,
snapshots/COMMIT/ whose files link to blobs/), pointed at by HF_HUB_CACHE."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from cachedattention.cli import build_parser, engine_config, main

MODEL_ID = "TestOrg/tiny-chat"
MAIN, DEV = "a" * 40, "b" * 40  # two commits: main's, and the dev branch's


def add_snapshot(cache: Path, model_id: str, commit: str, folder: Path, branch: str | None = "main") -> Path:
    """`folder`'s files as the hub caches them: each a link to its blob, `branch` naming the commit."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    if branch is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)  # (as the hub writes it: no newline)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, chat_model_dir, monkeypatch) -> Path:
    """A hub cache holding the tiny chat model at main, and at a dev branch with another config."""
    cache = tmp_path / "hub"
    add_snapshot(cache, MODEL_ID, MAIN, chat_model_dir)
    dev = tmp_path / "dev"
    shutil.copytree(chat_model_dir, dev)
    (dev / "generation_config.json").write_text('{"temperature": 0.25}')
    add_snapshot(cache, MODEL_ID, DEV, dev, branch="dev")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def snapshot_of(cache: Path, commit: str) -> str:
    return str(cache / "models--TestOrg--tiny-chat" / "snapshots" / commit)


def test_a_model_id_loads_its_snapshot_and_answers_as_its_folder(hub_cache, chat_model_dir, capsys):
    """`LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct")` was refused: "model path ... does not exist"."""
    from cachedattention import LLM

    llm = LLM(model=MODEL_ID)
    assert llm.engine.loaded.name == MODEL_ID  # (the server's model name, not the commit's hash)
    assert llm.engine.loaded.weights_id == LLM(model=str(chat_model_dir)).engine.loaded.weights_id
    assert main(["generate", MODEL_ID, "--prompt", "Hello", "--max-tokens", "4", "--no-store"]) == 0
    by_id = capsys.readouterr().out
    assert main(["generate", str(chat_model_dir), "--prompt", "Hello", "--max-tokens", "4", "--no-store"]) == 0
    assert by_id.strip() and by_id == capsys.readouterr().out


def test_a_revision_picks_a_branch_or_a_commit_of_the_cache(hub_cache):
    def model(*flags: str) -> str:
        return engine_config(build_parser().parse_args(["serve", MODEL_ID, *flags])).model

    assert model() == snapshot_of(hub_cache, MAIN)
    assert model("--revision", "dev") == snapshot_of(hub_cache, DEV)
    assert model("--revision", MAIN) == snapshot_of(hub_cache, MAIN)  # a commit itself
    for revision in ("nope", "../../x"):  # (a revision never leads out of the cache)
        with pytest.raises(ValueError, match=f"not in the local Hugging Face cache at revision '{re.escape(revision)}'"):
            model("--revision", revision)
    with pytest.raises(ValueError, match="is a path, not a model id"):
        engine_config(build_parser().parse_args(["serve", snapshot_of(hub_cache, MAIN), "--revision", "dev"]))


def test_model_cards_give_the_model_as_the_server_was_given_it(hub_cache, chat_model_dir, tmp_path, monkeypatch):
    """/v1/models' `root` is vLLM's args.model: the hub id served, not the cache's snapshot folder it
    loaded; a folder as typed (here a relative one)."""
    import httpx

    from tests.server.conftest import start_server

    def root(model: str) -> str:
        server = start_server(engine_config(build_parser().parse_args(["serve", model, "--no-store"])))
        try:
            return httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["root"]
        finally:
            server.stop()

    assert root(MODEL_ID) == MODEL_ID
    monkeypatch.chdir(tmp_path)
    shutil.copytree(chat_model_dir, tmp_path / "here")
    assert root("here") == "here"


def test_a_model_id_not_in_the_cache_says_so_and_how_to_get_it(hub_cache, capsys):
    from cachedattention import LLM

    with pytest.raises(ValueError) as e:
        LLM(model="TestOrg/missing")
    assert "not in the local Hugging Face cache" in str(e.value) and str(hub_cache) in str(e.value)
    assert "hf download TestOrg/missing" in str(e.value) and "huggingface-cli download TestOrg/missing" in str(e.value)
    assert main(["generate", "TestOrg/missing", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "'TestOrg/missing' does not exist" in err and "Traceback" not in err
    assert main(["serve", MODEL_ID, "--revision", "gone"]) == 2  # refused before any model is loaded
    assert "hf download TestOrg/tiny-chat --revision gone" in capsys.readouterr().err


def test_a_path_wins_over_a_model_id(hub_cache, chat_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(chat_model_dir, tmp_path / MODEL_ID)  # a folder named as the id, relative to here
    assert engine_config(build_parser().parse_args(["serve", MODEL_ID])).model == MODEL_ID


def test_the_tokenizer_and_the_download_dir_as_vllm_takes_them(hub_cache, chat_model_dir, tmp_path, monkeypatch):
    from cachedattention.model.loader import load_tokenizer

    args = build_parser().parse_args(["serve", str(chat_model_dir), "--tokenizer", MODEL_ID,
                                      "--tokenizer-revision", "dev"])  # fmt: skip
    assert engine_config(args).tokenizer == snapshot_of(hub_cache, DEV)
    assert load_tokenizer(MODEL_ID, 49152).encode("Hello") == load_tokenizer(str(chat_model_dir), 49152).encode("Hello")
    # --download-dir: the cache a model id is read from, wherever HF_HUB_CACHE points
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    args = build_parser().parse_args(["serve", MODEL_ID, "--download-dir", str(hub_cache)])
    assert engine_config(args).model == snapshot_of(hub_cache, MAIN)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        engine_config(build_parser().parse_args(["serve", MODEL_ID, "--download-dir", str(tmp_path / "empty")]))


def test_the_hub_cache_is_found_as_huggingface_hub_finds_it(monkeypatch, tmp_path):
    from cachedattention.model.hub_cache import hub_cache_dir, looks_like_model_id

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == tmp_path / "c"
    assert looks_like_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") and looks_like_model_id("gpt2")
    for not_an_id in ("/abs/path", "./rel", "a/b/c", "org--x/y", "a..b", "~/models/x"):
        assert not looks_like_model_id(not_an_id)


def test_llm_takes_vllms_revision_and_dtype_names(hub_cache):
    """LLM(revision=...) reads that branch's snapshot (its generation config's sampling defaults too),
    and vLLM's dtype names resolve as on the command line (auto and float: float32 on a CPU)."""
    from cachedattention import LLM

    dev = LLM(model=MODEL_ID, revision="dev", dtype="auto")
    assert dev.config.model == snapshot_of(hub_cache, DEV) and dev.config.dtype == "float32"
    assert dev.config.model_given == MODEL_ID  # (a server over this config names the id, as vLLM's)
    assert dev.get_default_sampling_params().temperature == 0.25
    assert LLM(model=MODEL_ID, dtype="float").config.model == snapshot_of(hub_cache, MAIN)
    with pytest.raises(ValueError, match="revision"):
        LLM(model=MODEL_ID, revision="no-such-branch")
