"""A request's stream of events between the engine thread and the event loop: an output the reader
has not taken yet is replaced by the next (which holds all it did), so a client that stops reading
its stream leaves one output waiting, not one per generated token."""

import asyncio
import threading

from cachedattention.outputs import RequestMetrics, RequestOutput
from cachedattention.server.engine_loop import RequestStream


def _output(tokens: list[int], new: list[int], finished: bool = False) -> RequestOutput:
    return RequestOutput("r", [1], list(tokens), "", finished, "length" if finished else None, RequestMetrics(0.0),
                         new_token_ids=list(new))  # fmt: skip


def test_outputs_not_read_yet_are_merged_and_other_events_keep_their_place():
    async def run() -> list:
        stream = RequestStream("r", asyncio.get_running_loop())

        def engine_thread() -> None:  # as the engine loop puts them: an event, then an output a step
            stream.put("accepted")
            tokens: list[int] = []
            for t in range(50):
                tokens.append(t)
                stream.put(_output(tokens, [t], finished=t == 49))

        producer = threading.Thread(target=engine_thread)
        producer.start()
        producer.join()
        await asyncio.sleep(0.05)  # every put has landed on the loop: nothing was read meanwhile
        first = await stream.get()
        rest = [await stream.get()]
        return [first, *rest, len(stream._items)]

    first, merged, left = asyncio.run(run())
    assert first == "accepted" and left == 0
    assert merged.finished and merged.token_ids == list(range(50)) and merged.new_token_ids == list(range(50))


def test_a_reader_that_keeps_up_gets_every_output():
    async def run() -> list:
        stream = RequestStream("r", asyncio.get_running_loop())
        got = []
        for t in range(5):
            stream.put(_output(list(range(t + 1)), [t], finished=t == 4))
            got.append(await stream.get())
        return got

    got = asyncio.run(run())
    assert [o.new_token_ids for o in got] == [[0], [1], [2], [3], [4]] and got[-1].finished
