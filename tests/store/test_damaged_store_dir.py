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
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    conv = first_turn(path, store, list(range(5, 50)))
    first_turn(path, store, list(range(60, 100)), session="other")
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
