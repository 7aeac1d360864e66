"""A store folder damaged or misused (found by fuzzing the command line and the store): a segment file
copied over another's, index rows that are not JSON or name a path, a budget lowered below what the
folder holds, a store_dir that is a file, a host too small for any segment with no disk tier. Each is
a clear error or a miss with the same output, never a traceback, a hang or another turn's KV."""

import shutil
import sqlite3

import pytest
import torch

from cachedattention import LLM
from cachedattention.cli import main
from cachedattention.store.disk import DiskTier
from cachedattention.store.segment import CorruptSegment, KVLayout, SegmentKV
from tests.store.test_durability import NO_DEVICE, PARAMS, disk_llm, first_turn, segment_files


def _stored(tiny_dirs, tmp_path, *others: str):
    """A tiny Llama's store folder holding session "s"'s first turn (and one of each other session):
    the model's path, the folder, and s's next prompt."""
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    conv = first_turn(path, store, list(range(5, 50)))
    for i, session in enumerate(others):
        first_turn(path, store, list(range(60 + 50 * i, 100 + 50 * i)), session=session)
    return path, store, conv


def test_a_segment_file_copied_over_another_is_corrupt(tmp_path):
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    disk = DiskTier(str(tmp_path), 1 << 20, "fp", layout)
    disk.put("a", SegmentKV(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4)))
    disk.put("b", SegmentKV(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4)))
    shutil.copyfile(disk.path("a"), disk.path("b"))  # the same size and model: every other check passes
    with pytest.raises(CorruptSegment, match="holds segment 'a'"):
        disk.open("b")
    disk.close()


def test_index_rows_that_are_not_json_or_name_a_path_are_dropped_and_the_rest_served(tiny_dirs, tmp_path, caplog):
    path, store, conv = _stored(tiny_dirs, tmp_path, "other")
    victim = tmp_path / "victim.kv"
    victim.write_bytes(b"not the store's")
    db = sqlite3.connect(str(store / "index.db"))
    fingerprint = db.execute("SELECT fingerprint FROM segments").fetchone()[0]
    db.execute("UPDATE records SET body='{not json' WHERE key='other'")
    db.execute("INSERT INTO records VALUES ('nulled', NULL, ?)", (fingerprint,))
    db.execute("INSERT INTO segments VALUES ('../../victim', 3, 15, ?)", (fingerprint,))
    db.commit()
    db.close()
    llm = disk_llm(path, store)
    out = llm.generate([conv], PARAMS, session_id="s")[0]
    assert out.metrics.cached_tokens["disk"] == len(conv) - 4  # the intact session is still served
    assert out.token_ids == LLM(model=str(path)).generate([conv], PARAMS)[0].token_ids
    assert victim.read_bytes() == b"not the store's"  # a row naming a path deletes nothing outside
    assert "unreadable" in caplog.text and "is not a segment's" in caplog.text
    llm.engine.store.check_integrity()


def test_a_budget_below_what_the_folder_holds_is_refused_and_nothing_is_lost(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    first_turn(path, store, list(range(5, 50)))
    files = {f.name: f.read_bytes() for f in segment_files(store)}
    with pytest.raises(ValueError, match="more than disk_bytes=1000"):
        LLM(model=str(path), enable_store=True, cache=NO_DEVICE, store_dir=str(store), disk_bytes=1000)
    assert {f.name: f.read_bytes() for f in segment_files(store)} == files


def test_a_store_dir_that_is_a_file_or_an_unreadable_index_is_a_clear_error(tiny_dirs, tmp_path, capsys):
    path, _ = tiny_dirs["llama"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        LLM(model=str(path), enable_store=True, store_dir=str(a_file))
    store = tmp_path / "st"
    store.mkdir()
    (store / "index.db").write_bytes(b"garbage " * 100)
    assert main(["generate", str(path), "--prompt", "hi", "--max-tokens", "2", "--store-dir", str(store)]) == 1
    assert "cannot open the store's index" in capsys.readouterr().err


def test_a_host_too_small_for_any_segment_and_no_disk_tier_recomputes(tiny_dirs):
    """Found by fuzzing: a turn planned on a segment that was still saving, which the host could not
    then take, found it in no tier: a TypeError in the load, and the abort that followed waited for
    the load's events for ever."""
    path, _ = tiny_dirs["llama"]
    llm = LLM(model=str(path), enable_store=True, host_bytes=0)
    plain = LLM(model=str(path))
    conv = list(range(5, 40))
    for _ in range(3):
        out = llm.generate([conv], PARAMS, session_id="s")[0]
        assert out.token_ids == plain.generate([conv], PARAMS)[0].token_ids
        conv = conv + out.token_ids + [7, 8]


def _edit_index(store, sql: str, *args) -> None:
    db = sqlite3.connect(str(store / "index.db"))
    db.execute(sql, args)
    db.commit()
    db.close()


def _served_from_disk(path, store, conv, session="s"):
    """A new engine on the folder starts, serves the session's next turn from disk with the plain
    engine's tokens, and passes its integrity checks; returns it."""
    llm = disk_llm(path, store)
    llm.engine.store.check_integrity()
    out = llm.generate([conv], PARAMS, session_id=session)[0]
    assert out.metrics.cached_tokens["disk"] == len(conv) - 4
    assert out.token_ids == LLM(model=str(path)).generate([conv], PARAMS)[0].token_ids
    llm.engine.store.check_integrity()
    return llm


@pytest.mark.parametrize("wrong", [1, 1 << 40])
def test_an_index_row_counting_other_bytes_than_its_file_counts_the_files(wrong, tiny_dirs, tmp_path, caplog):
    """(Found by fuzzing a damaged store folder: 2**40 refused the start as over budget; one byte
    more left check_integrity failing for good.)"""
    path, store, conv = _stored(tiny_dirs, tmp_path)
    _edit_index(store, "UPDATE segments SET nbytes = nbytes + ?", wrong)
    llm = _served_from_disk(path, store, conv)
    assert llm.stats()["disk_bytes_used"] == sum(f.stat().st_size for f in segment_files(store))
    assert "counting the file's" in caplog.text
    llm.close()


def test_a_record_row_that_is_not_text_is_dropped_and_the_rest_served(tiny_dirs, tmp_path, caplog):
    """(Found by fuzzing: one body that is not UTF-8 made the whole index unreadable.)"""
    path, store, conv = _stored(tiny_dirs, tmp_path, "other")
    _edit_index(store, "UPDATE records SET body = CAST(X'7bff' AS TEXT) WHERE key='other'")
    _served_from_disk(path, store, conv).close()
    assert "unreadable" in caplog.text


@pytest.mark.parametrize("name", ["leftover.tmp", "0123456789abcdef.kv"])
def test_a_folder_inside_the_segments_folder_is_left_alone(name, tiny_dirs, tmp_path, caplog):
    """(Found by fuzzing: the start-up sweep of orphan files raised IsADirectoryError.)"""
    path, store, conv = _stored(tiny_dirs, tmp_path)
    (store / "segments" / name).mkdir()
    _served_from_disk(path, store, conv).close()
    assert (store / "segments" / name).is_dir() and "cannot delete" in caplog.text


def test_a_record_row_keyed_otherwise_than_its_record_is_dropped_so_forgetting_forgets(tiny_dirs, tmp_path, caplog):
    """A row copied under another key (a damaged index) named the session's segments twice: after
    forget_session, the copy brought the session back at the next start. (Found by fuzzing.)"""
    path, store, conv = _stored(tiny_dirs, tmp_path)
    _edit_index(store, "INSERT INTO records SELECT 'other-key', body, fingerprint FROM records WHERE key='s'")
    llm = _served_from_disk(path, store, conv)
    assert "keyed 'other-key'" in caplog.text
    assert llm.forget_session("s")
    llm.close()
    assert segment_files(store) == []
    again = disk_llm(path, store)
    assert again.generate([conv], PARAMS, session_id="s")[0].metrics.cached_tokens["disk"] == 0
    again.close()


def test_a_deeply_nested_segment_header_is_corrupt():
    """(Found by fuzzing: json's RecursionError escaped as a load failure, the file kept.)"""
    from cachedattention.store import segment_format

    deep = b"[" * 200_000
    with pytest.raises(CorruptSegment, match="unreadable header"):
        segment_format.parse_header(segment_format.PREFIX.pack(segment_format.MAGIC, len(deep)), lambda n: deep[:n], "x.kv")
