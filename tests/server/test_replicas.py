"""Two servers sharing a remote tier, as replicas behind a load balancer that does not keep a
conversation on one replica: each turn goes to the other server, which fetches the history."""

from __future__ import annotations

import dataclasses
import time

import openai
import pytest

from tests.redis_server import RedisServer
from tests.server.conftest import engine_config, start_server
from tests.server.test_server import MAX_TOKENS, QUESTIONS, client, converse, metric_samples

PUBLISHED = ("cachedattention_engine_stat", (("name", "remote_records_published"),))


@pytest.fixture(scope="module")
def replicas(chat_model_dir, tmp_path_factory):
    redis = RedisServer(tmp_path_factory.mktemp("redis"))
    config = engine_config(chat_model_dir, store=True, prefix_cache=False)
    config = dataclasses.replace(config, store=dataclasses.replace(config.store, remote_url=redis.url))
    servers = [start_server(config), start_server(config)]
    yield [s.url for s in servers]
    for s in servers:
        s.stop()
    redis.stop()


def wait_published(url: str, n: int, timeout_s: float = 15.0) -> None:
    """A replica publishes a turn after answering it: wait until its n-th record is on the server."""
    deadline = time.monotonic() + timeout_s
    while metric_samples(url).get(PUBLISHED, 0) < n:
        assert time.monotonic() < deadline, "the replica did not publish its turn"
        time.sleep(0.05)


def test_a_conversation_across_replicas_reads_its_history_from_the_remote_tier(replicas, server):
    expected = [text for text, _ in converse(server.url, None, QUESTIONS)]  # the plain engine, recomputing
    messages: list[dict[str, str]] = []
    published = [0, 0]
    for turn, question in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": question})
        side = turn % 2
        r = client(replicas[side]).chat.completions.create(
            model="default", messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body={"session_id": "lb"}
        )
        text = r.choices[0].message.content
        assert text == expected[turn]
        by_tier = r.usage.prompt_tokens_details.cached_tokens_by_tier
        if turn:  # the other replica answered the turn before: its KV came through the remote tier
            assert by_tier["remote"] > 0 and r.usage.prompt_tokens_details.cached_tokens >= by_tier["remote"]
        published[side] += 1
        wait_published(replicas[side], published[side])
        messages.append({"role": "assistant", "content": text})
    assert metric_samples(replicas[0]).get(("cachedattention_cached_prompt_tokens_total", (("tier", "remote"),)), 0) > 0


def test_a_responses_conversation_continues_on_the_other_replica(replicas, reference):
    """/v1/responses behind a load balancer: each response is stored on the remote tier's server too,
    so the next request's previous_response_id is found on the other replica, and the turn's history
    comes from the remote tier; the answers equal a recomputed chat of the whole conversation."""
    messages: list[dict[str, str]] = []
    previous = None
    published = [metric_samples(url).get(PUBLISHED, 0) for url in replicas]
    for turn, question in enumerate(QUESTIONS[:3]):
        side = turn % 2
        r = client(replicas[side]).responses.create(model="default", input=question, previous_response_id=previous,
                                                    max_output_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
        messages.append({"role": "user", "content": question})
        assert r.output_text == reference(messages, MAX_TOKENS)
        if turn:
            assert r.usage.input_tokens_details.cached_tokens_by_tier["remote"] > 0
        messages.append({"role": "assistant", "content": r.output_text})
        wait_published(replicas[side], published[side] + 1)  # its KV reaches the remote tier after the answer
        published[side] += 1
        previous = r.id
    stored_by = (len(QUESTIONS[:3]) - 1) % 2
    other = client(replicas[1 - stored_by]).responses.retrieve(previous)
    assert other.id == previous and other.output_text == r.output_text
    client(replicas[1 - stored_by]).responses.delete(previous)
    with pytest.raises(openai.NotFoundError):  # the replica that stored it learns it was deleted
        client(replicas[stored_by]).responses.retrieve(previous)
    with pytest.raises(openai.NotFoundError):
        client(replicas[0]).responses.delete("resp_never_stored")
