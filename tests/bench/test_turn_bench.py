"""`cachedattention bench --mode turn` end to end on a tiny random model: every cell runs, hits what it should."""

import json

from cachedattention.bench.turn import CELLS
from cachedattention.cli import main


def test_turn_bench_runs_every_cell_and_writes_json(tiny_dirs, tmp_path, capsys):
    path, _ = tiny_dirs["llama"]
    out = tmp_path / "turn.json"
    # the bench itself raises when a cached cell does not hit ~the whole history
    assert main(["bench", "--mode", "turn", "--model", str(path), "--history", "48,96", "--new-tokens", "8",
                 "--repeats", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["history"]) == {"48", "96"}
    for row in data["history"].values():
        assert set(row) == {c.name for c in CELLS}
        assert all(r["ttft_s"] > 0 for r in row.values())
        assert row["host-sync"]["load_alone_s"] > 0
    text = capsys.readouterr().out
    assert "| 96 |" in text and "queued: preload / none" in text


def test_the_remote_cell_times_a_history_another_replica_stored(tiny_dirs, tmp_path, capsys):
    from tests.redis_server import RedisServer

    path, _ = tiny_dirs["llama"]
    out = tmp_path / "turn.json"
    redis = RedisServer(tmp_path)
    try:  # the bench raises unless the timed turn hits ~the whole history (here: fetched from remote)
        assert main(["bench", "--mode", "turn", "--model", str(path), "--history", "64", "--new-tokens", "8",
                     "--repeats", "1", "--cells", "remote", "--remote-url", redis.url, "--json", str(out)]) == 0
    finally:
        redis.stop()
    row = json.loads(out.read_text())["history"]["64"]
    assert set(row) == {"recompute", "remote"} and row["remote"]["ttft_s"] > 0
    assert "| 64 |" in capsys.readouterr().out


def test_the_turn_bench_removes_its_disk_cells_store_folders(tiny_dirs, tmp_path, monkeypatch):
    import tempfile

    path, _ = tiny_dirs["llama"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where mkdtemp puts the disk cells' stores
    assert main(["bench", "--mode", "turn", "--model", str(path), "--history", "48", "--new-tokens", "8",
                 "--repeats", "1", "--cells", "disk-cold-layerwise"]) == 0
    assert list(scratch.iterdir()) == []
