"""The fast GGUF reader against gguf's own `GGUFReader` (every metadata value, every tensor's type,
shape, offset and data), and a GGUF file's tokenizer read from the cache folder against
transformers' conversion of the file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cachedattention.model.gguf_loader import open_gguf
from cachedattention.model.gguf_reader import FastGGUFReader
from cachedattention.model.gguf_tokenizer import CACHE_FOLDER, gguf_tokenizer, tokenizer_key
from cachedattention.model.tokenizer import Tokenizer
from tests.gguf_files import write_tiny_gguf

FILES = {  # what each exercises: a byte-level or SentencePiece vocabulary, block types, stacked experts
    "qwen3-q8": dict(kind="qwen3", types={"attn_q": "Q8_0"}),
    "llama-rope-freqs": dict(kind="llama", types={"attn_q": "Q4_K", "attn_k": "Q5_1", "attn_v": "Q6_K",
                                                  "attn_output": "BF16", "ffn_gate": "F16", "ffn_down": "IQ4_NL"},
                             hidden_size=256, intermediate_size=512),  # (K-quants: rows of 256)
    "gemma3-spm": dict(kind="gemma3", sentencepiece=True),
    "phi3-spm": dict(kind="phi3-window", sentencepiece=True),
    "qwen3-moe": dict(kind="qwen3-moe", types={"ffn_up_exps": "Q4_0"}),
}


SMALL_VOCAB = "phi3-spm"  # (the cache's own tests: converted in a fraction of a 49k vocabulary's seconds)


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, options in FILES.items():
        folder = tmp_path_factory.mktemp(name)
        options = dict(options)
        write_tiny_gguf(options.pop("kind"), folder, **options)
        out[name] = folder / "model.gguf"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_the_fast_reader_reads_what_gguf_s_reader_reads(gguf_files, name):
    import gguf

    path = gguf_files[name]
    ours, theirs = FastGGUFReader(path), gguf.GGUFReader(path)
    their_keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # (its header as pseudo-fields)
    assert list(ours.fields) == their_keys
    for key in their_keys:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert (ours.alignment, ours.data_offset) == (theirs.alignment, theirs.data_offset)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.shape.tolist(), a.n_elements, a.n_bytes, a.data_offset) == (
            b.tensor_type, b.shape.tolist(), b.n_elements, b.n_bytes, b.data_offset), a.name  # fmt: skip
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name
    assert {t.tensor_type.name for t in ours.tensors} >= {"F32"}


def test_a_file_cut_anywhere_in_its_metadata_is_refused(gguf_files, tmp_path):
    data = gguf_files["qwen3-q8"].read_bytes()
    reader = FastGGUFReader(gguf_files["qwen3-q8"])
    vocab = reader.fields["tokenizer.ggml.tokens"]
    for cut in (6, 20, (vocab.start + vocab.end) // 2, reader.data_offset - 3, len(data) - 1):
        short = tmp_path / f"cut-{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="is not a readable GGUF file"):
            open_gguf(short)
    key = "tokenizer.ggml.tokens"
    count_at = vocab.start + 8 + len(key) + 4 + 4  # the key, the value's type, the items' type
    for at, count in ((count_at, 2**60), (16, 2**40), (8, 2**40)):  # the vocabulary's, the keys', the tensors'
        damaged = bytearray(data)
        damaged[at : at + 8] = count.to_bytes(8, "little")
        (tmp_path / "count.gguf").write_bytes(bytes(damaged))
        with pytest.raises(ValueError, match="cannot fit in the file"):  # at once, not read to the file's end
            open_gguf(tmp_path / "count.gguf")
    (tmp_path / "not.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match="magic"):
        open_gguf(tmp_path / "not.gguf")


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    ha, hb = a.hf, b.hf
    assert type(ha) is type(hb)
    assert ha.get_vocab() == hb.get_vocab()
    assert (ha.bos_token_id, ha.eos_token_id, ha.pad_token_id, ha.unk_token_id) == (
        hb.bos_token_id, hb.eos_token_id, hb.pad_token_id, hb.unk_token_id)  # fmt: skip
    assert sorted(ha.all_special_ids) == sorted(hb.all_special_ids)
    assert {i: str(t) for i, t in ha.added_tokens_decoder.items()} == {i: str(t) for i, t in hb.added_tokens_decoder.items()}
    assert ha.chat_template == hb.chat_template
    texts = ["Hello world", "  two  spaces\nand a line", "naïve café 日本語 🙂", "<|im_start|>user\nhi<|im_end|>",
             "<start_of_turn>model<end_of_turn>", "<|user|>x<|end|>", ""]  # fmt: skip
    for text in texts:
        assert a.encode(text) == b.encode(text), text
        for special in (True, False):
            assert ha(text, add_special_tokens=special)["input_ids"] == hb(text, add_special_tokens=special)["input_ids"]
    ids = a.encode(" ".join(texts))
    assert ha.decode(ids) == hb.decode(ids)
    if ha.chat_template:
        messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"}]  # fmt: skip
        assert a.render_chat(messages) == b.render_chat(messages)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3-q8", "gemma3-spm", "phi3-spm"])
def test_a_gguf_tokenizer_from_the_cache_is_the_one_transformers_converts(gguf_files, name, tmp_path, monkeypatch):
    import cachedattention.model.gguf_tokenizer as gguf_tokenizer_module

    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path))
    path = gguf_files[name]
    direct = Tokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    conversions = []  # (transformers' conversion of a 150,000-token vocabulary takes seconds: once here)
    monkeypatch.setattr(gguf_tokenizer_module, "_converted", lambda p: conversions.append(p) or direct)
    first = gguf_tokenizer(path)  # converted and saved
    assert conversions == [path] and first is direct
    folder = tmp_path / CACHE_FOLDER / tokenizer_key(FastGGUFReader(path))
    assert (folder / "converted").is_file()
    second = gguf_tokenizer(path)  # from the cache folder
    assert second.hf.name_or_path == str(folder) and conversions == [path]
    _same_tokenizer(direct, second)


def test_the_cache_key_is_the_vocabulary_and_template_not_the_weights(gguf_files, tmp_path):
    keys = {name: tokenizer_key(FastGGUFReader(p)) for name, p in gguf_files.items()}
    assert keys["qwen3-q8"] != keys["gemma3-spm"] != keys["phi3-spm"]
    assert keys["qwen3-q8"] != keys["llama-rope-freqs"]  # (the same vocabulary, another architecture)
    again = tmp_path / "again"
    write_tiny_gguf("qwen3", again)  # other random weights, other block types: the same tokenizer
    assert tokenizer_key(FastGGUFReader(again / "model.gguf")) == keys["qwen3-q8"]
    copy = tmp_path / "edited.gguf"  # one byte of one merge changed: another tokenizer
    copy.write_bytes(gguf_files["qwen3-q8"].read_bytes())
    merges = FastGGUFReader(copy).fields["tokenizer.ggml.merges"]
    first = merges.start + 8 + len("tokenizer.ggml.merges") + 4 + 4 + 8 + 8  # (type, item type, count, length)
    data = bytearray(copy.read_bytes())
    merge = merges.value[0].encode()
    assert data[first : first + len(merge)] == merge
    data[first] ^= 1
    copy.write_bytes(bytes(data))
    assert tokenizer_key(FastGGUFReader(copy)) != keys["qwen3-q8"]


def test_a_damaged_cache_entry_is_converted_again_and_an_unwritable_cache_costs_nothing(
        gguf_files, tmp_path, monkeypatch, caplog):  # fmt: skip
    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path / "home"))
    path = gguf_files[SMALL_VOCAB]
    direct = gguf_tokenizer(path)
    folder = tmp_path / "home" / CACHE_FOLDER / tokenizer_key(FastGGUFReader(path))
    (folder / "tokenizer.json").write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="cachedattention.model.gguf_tokenizer"):
        again = gguf_tokenizer(path)
    assert "cannot be read" in caplog.text
    _same_tokenizer(direct, again)
    assert Tokenizer.from_pretrained(str(folder)).encode("Hello") == direct.encode("Hello")  # (replaced)
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("CACHEDATTENTION_HOME", str(blocked))  # no folder can be made under a file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cachedattention.model.gguf_tokenizer"):
        _same_tokenizer(direct, gguf_tokenizer(path))
    assert "cannot be kept" in caplog.text


def _metadata_only(path: Path, *fields: bytes) -> Path:
    import struct

    def text(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    arch = text("general.architecture") + struct.pack("<I", 8) + text("llama")
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1 + len(fields)) + arch + b"".join(fields))
    return path


def test_a_non_uint32_alignment_and_arrays_nested_past_the_stack_are_refused(tmp_path):
    """As gguf's reader and llama.cpp: general.alignment is a uint32 (a uint64 64 is refused); arrays
    of arrays nested thousands deep are a ValueError, not a RecursionError past open_gguf's callers."""
    import struct

    key = struct.pack("<Q", 17) + b"general.alignment"
    with pytest.raises(ValueError, match="uint32"):
        FastGGUFReader(_metadata_only(tmp_path / "a.gguf", key + struct.pack("<IQ", 10, 64)))
    assert FastGGUFReader(_metadata_only(tmp_path / "b.gguf", key + struct.pack("<II", 4, 64))).alignment == 64
    nested = struct.pack("<Q", 1) + b"k" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)
    with pytest.raises(ValueError, match="nested"):
        FastGGUFReader(_metadata_only(tmp_path / "c.gguf", nested))
    with pytest.raises(ValueError):  # (the tokenizer's cache reads the file with the same reader)
        gguf_tokenizer(tmp_path / "c.gguf")


def test_a_cache_entry_is_readable_by_the_home_s_other_users_and_an_unreadable_one_is_a_miss(
        gguf_files, tmp_path, monkeypatch):  # fmt: skip
    import os
    import stat

    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path / "home"))
    path = gguf_files[SMALL_VOCAB]
    direct = gguf_tokenizer(path)
    folder = tmp_path / "home" / CACHE_FOLDER / tokenizer_key(FastGGUFReader(path))
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # (mkdtemp's 0700: other users shut out)
    real_is_file = Path.is_file

    def denied(self: Path) -> bool:  # another user's 0700 entry: stat is EACCES, which is_file raises
        if self.name == "converted":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", denied)
    _same_tokenizer(direct, gguf_tokenizer(path))  # converted again, not a PermissionError


def test_a_save_killed_midway_leaves_no_folder_for_good(gguf_files, tmp_path, monkeypatch):
    """A process killed while saving leaves its temporary folder; the next save removes one that is
    stale (an hour old), and leaves a recent one (another process's save in progress) alone."""
    import os
    import time

    monkeypatch.setenv("CACHEDATTENTION_HOME", str(tmp_path))
    cache = tmp_path / CACHE_FOLDER
    stale, recent = cache / ".save-killed", cache / ".save-running"
    for folder in (stale, recent):
        folder.mkdir(parents=True)
        (folder / "tokenizer.json").write_text("{}")
    hours_ago = time.time() - 7200
    os.utime(stale, (hours_ago, hours_ago))
    gguf_tokenizer(gguf_files[SMALL_VOCAB])  # converted and saved
    assert not stale.exists() and recent.exists()


def _named_file(path: Path, name: str | None) -> Path:
    """A GGUF file of metadata alone: a llama architecture, a four-token vocabulary, a model name."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if name is not None:
        writer.add_name(name)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<s>"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_model_s_name_is_in_the_key(tmp_path):
    """transformers reads a llama file named "mistral" as a Mistral model, whose tokenizer class may
    differ: the name is part of the key."""
    keys = [tokenizer_key(FastGGUFReader(_named_file(tmp_path / f"{i}.gguf", name)))
            for i, name in enumerate(["mistral", "Llama", "Llama", None])]  # fmt: skip
    assert keys[0] != keys[1] == keys[2] != keys[3]
