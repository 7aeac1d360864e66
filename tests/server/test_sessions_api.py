"""DELETE /v1/sessions/{id}: a client forgets a conversation's KV on the server."""

from __future__ import annotations

import httpx

from tests.server.conftest import needs_store
from tests.server.test_server import client


@needs_store
def test_a_forgotten_session_is_computed_whole_next_and_gone_after(store_server):
    c = client(store_server.url)
    messages = [{"role": "user", "content": "Tell me about the sea."}]

    def turn():
        return c.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0,
                                         extra_body={"session_id": "user/42"})  # fmt: skip

    first = turn()
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the waves?"}]  # fmt: skip
    assert turn().usage.prompt_tokens_details.cached_tokens > 0
    gone = httpx.delete(f"{store_server.url}/v1/sessions/user/42", timeout=30)
    assert gone.status_code == 200 and gone.json() == {"id": "user/42", "object": "session", "deleted": True}
    again = httpx.delete(f"{store_server.url}/v1/sessions/user/42", timeout=30)
    assert again.status_code == 404 and again.json()["error"]["param"] == "session_id"
    assert turn().usage.prompt_tokens_details.cached_tokens == 0  # device pages included
    bad = httpx.delete(f"{store_server.url}/v1/sessions/anon-1", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "session_id"
