"""`bench --mode policy` runs the simulator for the three policies and writes the documented JSON."""

import json

from cachedattention.cli import main


def test_policy_bench_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["bench", "--mode", "policy", "--quick", "--sessions", "300", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"lookahead", "lru", "fifo"}
    for r in data["policies"].values():
        assert 0.0 <= r["hit_rate"] <= 1.0 and 0.0 <= r["host_hit_share"] <= 1.0
    assert data["policies"]["lookahead"]["host_hit_share"] > data["policies"]["lru"]["host_hit_share"]
    printed = capsys.readouterr().out
    assert "| lookahead |" in printed and "lookahead reads disk -> host at" in printed
    foresight = data["references"]["clairvoyant"]
    assert foresight["policy"] == "clairvoyant" and foresight["turns"] == data["policies"]["lookahead"]["turns"]
    assert "with foresight: look-ahead with clairvoyant eviction" in printed
    assert f"{foresight['host_hit_share']:.1%} of hits from host" in printed
    look = data["policies"]["lookahead"]
    assert look["prefetches_used"] > 0 and look["prefetch_lead_p10_s"] <= look["prefetch_lead_p50_s"]
    assert 0 < look["prefetch_rate_p50_bytes_s"] <= look["prefetch_rate_p90_bytes_s"]


def test_policy_bench_with_timed_disk_reads(tmp_path, capsys):
    out = tmp_path / "p.json"
    args = ["bench", "--mode", "policy", "--quick", "--sessions", "300", "--json", str(out)]
    assert main(args + ["--disk-read-gbps", "1"]) == 0
    timed = json.loads(out.read_text())
    assert timed["setting"]["disk_read_gbps_full_scale"] == 1.0
    assert "disk reads 1.0 GB/s" in capsys.readouterr().out
    assert main(args) == 0
    instant = json.loads(out.read_text())["policies"]["lookahead"]
    # reads that take time land late: fewer hits come from host than when they are instant
    assert timed["policies"]["lookahead"]["host_hit_share"] < instant["host_hit_share"]


def test_policy_bench_with_windowed_layers(tmp_path, capsys):
    """A KV of the same size per token, 5/6 of it in windowed layers: host copies of long sessions are
    smaller, so a load from disk reads less (the layers host keeps)."""
    out = tmp_path / "p.json"
    args = ["bench", "--mode", "policy", "--quick", "--sessions", "300", "--json", str(out)]
    assert main(args) == 0
    dense = json.loads(out.read_text())["policies"]["lookahead"]
    assert main(args + ["--windowed-share", "0.833", "--window-reach", "1040"]) == 0
    data = json.loads(out.read_text())
    windowed = data["policies"]["lookahead"]
    assert data["setting"]["windowed_share"] == 0.833 and data["setting"]["window_reach_tokens"] == 1040
    assert "83.3% of the KV in windowed layers" in capsys.readouterr().out
    assert windowed["bytes_loaded"] < 0.9 * dense["bytes_loaded"] and windowed["bytes_prefetched"] <= dense["bytes_prefetched"]
    assert windowed["turns"] == dense["turns"] and windowed["hit_rate"] >= dense["hit_rate"] - 0.01
