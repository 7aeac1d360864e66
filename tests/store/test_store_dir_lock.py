"""One engine per store folder: a second one, in this process or another, is refused with a clear
error before it touches anything (at start-up it would take the first one's files in flight for
orphans); the folder is free again once the first closes or its process dies, even by SIGKILL."""

import signal
import subprocess
import sys

import pytest
import torch

from cachedattention.cli import main
from cachedattention.store.dir_lock import StoreDirInUse
from cachedattention.store.disk import DiskTier
from cachedattention.store.segment import KVLayout, SegmentKV
from tests.store.test_durability import PARAMS, disk_llm, first_turn, segment_files

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)

HOLD_SCRIPT = """
import sys, torch
from cachedattention.store.disk import DiskTier
from cachedattention.store.segment import KVLayout
tier = DiskTier(sys.argv[1], 1 << 20, "fp", KVLayout(2, 1, 4, torch.float32))
print("open", flush=True)
sys.stdin.read()
"""


def test_a_second_disk_tier_in_this_process_is_refused_until_the_first_closes(tmp_path):
    first = DiskTier(str(tmp_path), 1 << 20, "fp", LAYOUT)
    first.put("a", SegmentKV(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4)))
    (tmp_path / "segments" / "b.kv.tmp").write_bytes(b"a write in flight")
    with pytest.raises(StoreDirInUse, match=r"in use by another engine \(this process\)"):
        DiskTier(str(tmp_path), 1 << 20, "fp", LAYOUT)
    assert (tmp_path / "segments" / "b.kv.tmp").exists()  # the refused one deleted nothing
    first.check_integrity()
    first.close()
    second = DiskTier(str(tmp_path), 1 << 20, "fp", LAYOUT)
    assert second.contains("a")
    second.close()


@pytest.mark.slow
def test_another_process_holding_the_folder_is_named_and_its_death_frees_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(StoreDirInUse, match=rf"\(process {proc.pid}\)"):
            DiskTier(str(tmp_path), 1 << 20, "fp", LAYOUT)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    DiskTier(str(tmp_path), 1 << 20, "fp", LAYOUT).close()  # the kernel let go of a killed holder's lock


def test_a_second_engine_on_one_store_dir_is_a_clear_error_and_the_first_keeps_serving(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    conv = first_turn(path, store, list(range(5, 50)))
    llm = disk_llm(path, store)
    files = {f.name: f.read_bytes() for f in segment_files(store)}
    with pytest.raises(ValueError, match=r"give each engine its own store_dir .*, or close\(\) the other one first"):
        disk_llm(path, store)
    assert {f.name: f.read_bytes() for f in segment_files(store)} == files
    out = llm.generate([conv], PARAMS, session_id="s")[0]
    assert out.metrics.cached_tokens["disk"] == len(conv) - 4
    llm.engine.store.check_integrity()
    llm.close()
    disk_llm(path, store).close()  # closed: the folder is free


def test_an_engine_of_this_process_no_longer_referenced_lets_the_folder_go(tiny_dirs, tmp_path):
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    conv = first_turn(path, store, list(range(5, 50)))
    llm = disk_llm(path, store)
    llm.generate([conv], PARAMS, session_id="s")
    del llm  # never closed, and held in cycles: collected (and closed) when the next engine asks
    again = disk_llm(path, store)
    assert again.generate([conv], PARAMS, session_id="s")[0].metrics.cached_tokens["disk"] > 0
    again.close()


def test_the_command_line_reports_a_folder_in_use(tiny_dirs, tmp_path, capsys):
    path, _ = tiny_dirs["llama"]
    store = tmp_path / "st"
    llm = disk_llm(path, store)
    try:
        rc = main(["generate", str(path), "--prompt", "hi", "--max-tokens", "2", "--store-dir", str(store)])
    finally:
        llm.close()
    assert rc == 2  # (a ValueError: the command line names a folder it cannot have)
    err = capsys.readouterr().err
    assert "error:" in err and "in use by another engine (this process)" in err and "Traceback" not in err
    disk_llm(path, store).close()  # (the refused command held nothing)
