import json

import pytest

from cachedattention.bench.cost import COST_FORMULA, Prices, serving_cost
from cachedattention.bench.metrics import TurnRecord, check_consistency, summarize
from cachedattention.bench.report import markdown_table, write_json, write_plots


def _records(ttft_scale: float = 1.0) -> list[TurnRecord]:
    s = ttft_scale
    return [
        TurnRecord("s0", 0, 100, {}, 11, 1.0 * s, 1.0 * s + 1.0),
        TurnRecord(
            "s0",
            1,
            200,
            {"device": 50, "host": 100},
            21,
            0.5 * s,
            0.5 * s + 1.0,
            prefill_s=0.25 * s,
        ),
        TurnRecord("s1", 0, 100, {}, 1, 2.0 * s, 2.0 * s),
        TurnRecord("s1", 1, 200, {"disk": 100}, 5, 1.5 * s, 1.5 * s + 1.0, queue_s=0.4 * s),
    ]


def test_summarize_hand_computed_values():
    s = summarize(_records(), wall_s=10.0, system_name="CA", host_bytes=2e9)
    assert (s.num_sessions, s.num_turns) == (2, 4)
    assert s.ttft_mean_s == pytest.approx(1.25)
    assert s.ttft_p50_s == pytest.approx(1.25)  # sorted 0.5, 1, 1.5, 2
    assert s.ttft_p90_s == pytest.approx(1.85)  # 1.5 + 0.7 * 0.5
    assert s.ttft_later_mean_s == pytest.approx(1.0)
    assert s.queue_later_mean_s == pytest.approx(0.4)  # the one later turn whose wait is known
    assert s.ttft_by_turn == pytest.approx({0: 1.5, 1: 1.0})
    assert (
        s.prompt_tokens == 600 and s.cached_tokens == 250 and s.generated_tokens == 38
    )
    assert s.prefill_s == pytest.approx(
        4.75
    )  # prefill_s for turn (s0, 1), TTFT elsewhere
    assert s.prefill_tok_s == pytest.approx(600 / 4.75)
    assert s.decode_tok_s == pytest.approx((10 + 20 + 0 + 4) / 3.0)
    assert s.compute_s == pytest.approx(7.75)
    assert s.hit_rate == pytest.approx(250 / 600)
    assert s.hit_rate_by_tier == pytest.approx(
        {"device": 50 / 600, "host": 100 / 600, "disk": 100 / 600, "remote": 0.0}
    )
    assert s.cost.gpu_usd == pytest.approx(7.75 / 3600 * 5)
    assert s.cost.dram_usd == pytest.approx(2 * 10 / 3600 * 0.0088)


def test_summarize_first_turn_only_and_explicit_compute():
    s = summarize([_records()[0]], wall_s=1.0, system_name="RE", compute_s=0.5)
    assert s.ttft_later_mean_s is None and s.ttft_later_p99_s is None and s.queue_later_mean_s is None
    assert s.compute_s == 0.5 and s.hit_rate == 0.0
    with pytest.raises(ValueError, match="no records"):
        summarize([], wall_s=1.0, system_name="RE")


@pytest.mark.parametrize(
    "record, message",
    [
        (TurnRecord("x", 0, 10, {"host": 11}, 1, 0.1, 0.2), "cached 11 > prompt 10"),
        (TurnRecord("x", 0, 10, {"gpu": 1}, 1, 0.1, 0.2), "unknown cache tiers"),
        (TurnRecord("x", 0, 10, {}, 1, 0.3, 0.2), "ttft_s"),
        (TurnRecord("x", 0, 10, {}, 1, 0.1, 0.2, prefill_s=0.2), "prefill_s"),
        (TurnRecord("x", 0, 10, {"disk": -1}, 1, 0.1, 0.2), "negative"),
        (TurnRecord("x", 0, 10, {}, 1, 0.1, 0.2, queue_s=0.15), "queue_s"),
    ],
)
def test_check_consistency_rejects_impossible_records(record, message):
    with pytest.raises(ValueError, match=message):
        check_consistency([record])


def test_check_consistency_rejects_duplicate_turns():
    r = _records()[0]
    with pytest.raises(ValueError, match="duplicate"):
        check_consistency([r, r])
    check_consistency(_records())  # a valid run passes


def test_cost_formula_values():
    c = serving_cost(compute_s=3600, host_bytes=100e9, disk_bytes=1e12, wall_s=7200)
    assert c.gpu_usd == pytest.approx(5.0)
    assert c.dram_usd == pytest.approx(100 * 2 * 0.0088)
    assert c.ssd_usd == pytest.approx(1000 * 2 * 0.000082)
    assert c.total_usd == pytest.approx(5.0 + 1.76 + 0.164)
    assert serving_cost(
        3600, 0, 0, 1, Prices(gpu_usd_per_h=2.0)
    ).total_usd == pytest.approx(2.0)
    assert "0.0088" in COST_FORMULA and "$5/h" in COST_FORMULA
    with pytest.raises(ValueError, match="wall_s"):
        serving_cost(1, 0, 0, -1)


@pytest.fixture
def summaries():
    # CA is RE with every TTFT halved; same tokens, so prefill throughput roughly doubles.
    return {
        "RE": summarize(_records(1.0), wall_s=10.0, system_name="RE"),
        "CA": summarize(_records(0.5), wall_s=10.0, system_name="CA", host_bytes=1e9),
    }


def test_markdown_table_has_every_system_and_ratio(summaries):
    table = markdown_table(summaries, baseline="RE")
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "TTFT vs RE" in lines[0]
    ca_row = next(line for line in lines if line.startswith("| CA |"))
    assert "0.50×" in ca_row  # TTFT ratio
    assert "1.00×" in next(line for line in lines if line.startswith("| RE |"))
    assert f"{summaries['CA'].prefill_tok_s:.1f}" in ca_row
    with pytest.raises(ValueError, match="baseline"):
        markdown_table(summaries, baseline="LMCache")


def test_write_json_keys(tmp_path, summaries):
    path = write_json(
        tmp_path / "out" / "r.json", summaries, {"workload": {"sessions": 2}}
    )
    data = json.loads(path.read_text())
    assert set(data) == {"systems", "workload"}
    assert set(data["systems"]) == {"RE", "CA"}
    re = data["systems"]["RE"]
    for key in (
        "ttft_p50_s",
        "ttft_mean_s",
        "prefill_tok_s",
        "cost_usd",
        "hit_rate",
        "decode_tok_s",
        "ttft_later_mean_s",
        "hit_rate_by_tier",
        "gpu_usd",
        "dram_usd",
        "ttft_by_turn",
    ):
        assert key in re
    assert re["ttft_mean_s"] == pytest.approx(1.25)
    assert re["ttft_by_turn"] == {"0": 1.5, "1": 1.0}
    ca = data["systems"]["CA"]
    assert (
        ca["cost_usd"] == pytest.approx(ca["gpu_usd"] + ca["dram_usd"] + ca["ssd_usd"])
        and ca["dram_usd"] > 0
    )
    with pytest.raises(ValueError, match="reserved"):
        write_json(tmp_path / "x.json", summaries, {"systems": 1})


def test_write_plots_creates_pngs(tmp_path, summaries):
    paths = write_plots(tmp_path / "plots", summaries)
    assert {p.name for p in paths} == {
        "ttft_by_turn.png",
        "hit_rate_by_tier.png",
        "cost.png",
    }
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
