import json
import math
import random
import statistics

import pytest

from cachedattention.bench.workload import (
    Session,
    Turn,
    Workload,
    WorkloadSpec,
    generate_workload,
    load_sharegpt,
    synthetic_text,
)

SPEC = WorkloadSpec(num_sessions=2000, seed=123)


@pytest.fixture(scope="module")
def big() -> Workload:
    return generate_workload(SPEC)


def test_turns_per_session_match_sharegpt_mean(big):
    counts = [len(s.turns) for s in big.sessions]
    assert min(counts) >= 1
    assert abs(big.mean_turns - 5.75) <= 0.1 * 5.75
    # geometric-like: single-turn sessions are the most common count
    assert counts.count(1) == max(counts.count(k) for k in set(counts))


def test_lengths_are_lognormal_around_spec_and_clipped(big):
    user = [t.user_tokens for s in big.sessions for t in s.turns]
    answer = [t.answer_tokens for s in big.sessions for t in s.turns]
    assert (
        abs(statistics.median(user) - SPEC.user_median_tokens)
        <= 0.1 * SPEC.user_median_tokens
    )
    assert (
        abs(statistics.median(answer) - SPEC.answer_median_tokens)
        <= 0.1 * SPEC.answer_median_tokens
    )
    assert abs(statistics.stdev(math.log(u) for u in user) - SPEC.user_sigma) <= 0.1
    assert abs(statistics.stdev(math.log(a) for a in answer) - SPEC.answer_sigma) <= 0.1
    assert SPEC.min_user_tokens <= min(user) and max(user) <= SPEC.max_user_tokens
    assert (
        SPEC.min_answer_tokens <= min(answer) and max(answer) <= SPEC.max_answer_tokens
    )


def test_arrivals_are_poisson_and_think_times_exponential(big):
    arrivals = [s.arrival_s for s in big.sessions]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0
    assert (
        abs(arrivals[-1] / len(arrivals) - 1 / SPEC.session_rate)
        <= 0.1 / SPEC.session_rate
    )
    assert all(s.turns[0].think_time_s == 0.0 for s in big.sessions)
    thinks = [t.think_time_s for s in big.sessions for t in s.turns[1:]]
    assert (
        abs(statistics.mean(thinks) - SPEC.mean_think_time_s)
        <= 0.1 * SPEC.mean_think_time_s
    )


def test_scale_and_max_knobs_shorten_turns():
    w = generate_workload(
        WorkloadSpec(
            num_sessions=200, scale=0.1, max_user_tokens=16, max_answer_tokens=8
        )
    )
    assert max(t.user_tokens for s in w.sessions for t in s.turns) <= 16
    assert max(t.answer_tokens for s in w.sessions for t in s.turns) <= 8
    assert statistics.median(t.user_tokens for s in w.sessions for t in s.turns) < 16


def test_same_seed_same_workload_different_seed_differs():
    spec = WorkloadSpec(num_sessions=50, seed=7)
    assert generate_workload(spec) == generate_workload(spec)
    assert generate_workload(spec) != generate_workload(
        WorkloadSpec(num_sessions=50, seed=8)
    )


def test_text_does_not_change_counts_and_matches_length():
    plain = generate_workload(WorkloadSpec(num_sessions=30, seed=1))
    texty = generate_workload(WorkloadSpec(num_sessions=30, seed=1, with_text=True))
    for a, b in zip(plain.sessions, texty.sessions):
        assert [(t.user_tokens, t.answer_tokens, t.think_time_s) for t in a.turns] == [
            (t.user_tokens, t.answer_tokens, t.think_time_s) for t in b.turns
        ]
        assert all(len(t.user_text.split()) == t.user_tokens for t in b.turns)
    assert plain.sessions[0].turns[0].user_text is None


def test_synthetic_text_is_deterministic():
    assert synthetic_text(20, random.Random(3)) == synthetic_text(20, random.Random(3))
    assert synthetic_text(20, random.Random(3)) != synthetic_text(20, random.Random(4))
    assert synthetic_text(0, random.Random(3)) == ""
    with pytest.raises(ValueError):
        synthetic_text(-1, random.Random(3))


def test_json_round_trip_is_exact(tmp_path):
    w = generate_workload(WorkloadSpec(num_sessions=40, seed=5, with_text=True))
    path = tmp_path / "w.json"
    w.to_json(path)
    back = Workload.from_json(path)
    assert back == w
    assert back.sessions[3].arrival_s == w.sessions[3].arrival_s  # bit-exact floats
    assert (
        back.total_user_tokens == w.total_user_tokens and back.num_turns == w.num_turns
    )


def test_from_json_rejects_other_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"foo": 1}')
    with pytest.raises(ValueError, match="Workload"):
        Workload.from_json(path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_sessions": 0},
        {"mean_turns": 0.5},
        {"scale": 0},
        {"session_rate": 0},
        {"min_user_tokens": 10, "max_user_tokens": 5},
        {"mean_think_time_s": -1},
    ],
)
def test_bad_spec_raises(kwargs):
    with pytest.raises(ValueError, match="WorkloadSpec"):
        WorkloadSpec(**kwargs)


def test_bad_turn_and_session_raise():
    with pytest.raises(ValueError):
        Turn(0, 5, 0.0)
    with pytest.raises(ValueError):
        Session("x", 0.0, ())


def _msg(role, text):
    return {"from": role, "value": text}


SHAREGPT = [
    {
        "id": "a",
        "conversations": [
            _msg("human", "hello world!"),
            _msg("gpt", "x" * 40),
            _msg("human", "again"),
            _msg("gpt", "ok"),
        ],
    },
    {
        "id": "b",
        "conversations": [
            _msg("system", "be brief"),
            _msg("human", "hi"),
            _msg("gpt", "yo"),
            _msg("human", "dangling question"),
        ],
    },
    {"id": "no-conversations"},
    {"id": "not-a-list", "conversations": "hello"},
    {"id": "gpt-only", "conversations": [_msg("gpt", "nobody asked")]},
    {"id": "bad-message", "conversations": [_msg("human", "q"), {"from": "gpt"}]},
    "not a dict",
    {"id": "a", "conversations": [_msg("human", "dup id"), _msg("gpt", "fine")]},
]


def test_load_sharegpt_pairs_turns_and_skips_malformed(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(SHAREGPT))
    w = load_sharegpt(path, spec=WorkloadSpec(seed=9))
    assert [s.session_id for s in w.sessions] == ["a", "b", "a+"]
    assert w.skipped == 5 and w.seed == 9 and w.source == "sharegpt:sg.json"
    a, b = w.sessions[0], w.sessions[1]
    assert [(t.user_tokens, t.answer_tokens) for t in a.turns] == [
        (3, 10),
        (1, 1),
    ]  # 0.25 tokens/char
    assert a.turns[0].user_text == "hello world!" and a.turns[1].answer_text == "ok"
    assert (
        len(b.turns) == 1 and b.turns[0].user_text == "be brief\nhi"
    )  # system folded in, dangling dropped
    assert a.turns[0].think_time_s == 0.0 and a.turns[1].think_time_s > 0
    assert load_sharegpt(path, spec=WorkloadSpec(seed=9)) == w  # seeded arrivals


def test_load_sharegpt_tokenizer_and_max_sessions(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(SHAREGPT))
    w = load_sharegpt(path, max_sessions=1, tokenizer=str.split)
    assert w.num_sessions == 1
    assert [(t.user_tokens, t.answer_tokens) for t in w.sessions[0].turns] == [
        (2, 1),
        (1, 1),
    ]


def test_load_sharegpt_rejects_non_sharegpt_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not json")
    with pytest.raises(ValueError, match="not a JSON"):
        load_sharegpt(text)
    obj = tmp_path / "obj.json"
    obj.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON list"):
        load_sharegpt(obj)
