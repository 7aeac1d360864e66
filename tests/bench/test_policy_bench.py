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
