"""A reference, not a policy: look-ahead's prefetching with eviction that knows the future.

Belady's rule for the store: the session demoted (or dropped from disk) first is the one whose
next turn comes last, and first of all those that never come back. Only the simulator can run
it: it reads each session's next arrival from the trace. Against it, a real policy's host-hit
share shows what eviction with perfect foresight of arrivals wins. It is not an optimum: sessions
differ in size (demoting one large session can keep several small ones), and prefetching shares the room.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from cachedattention.store.ledger import LedgerEntry, TierLedger
from cachedattention.store.policy import LookaheadPolicy, PolicyConfig


class ClairvoyantPolicy(LookaheadPolicy):
    """Look-ahead (same prefetch window and protection), evicting by each session's next use.

    `next_use`: session id -> when its next job arrives (or arrived, if it is queued); a
    session absent from it is never used again (a running job's session: its copy is replaced when
    the job ends, so its next use is the job after). The simulator keeps it current.
    """

    name = "clairvoyant"
    disk_order = None  # (its order is by the next use, which no kept order follows)

    def __init__(self, config: PolicyConfig, next_use: Mapping[str, float]) -> None:
        if config.name != "lookahead":
            raise ValueError(f"clairvoyant eviction extends look-ahead's prefetching; got policy {config.name!r}")
        super().__init__(config)
        self.next_use = next_use

    def _host_key(self, ledger: TierLedger, queue: Sequence[str]) -> Callable[[LedgerEntry], tuple]:
        # smaller goes first: never used again (-inf), then the farthest next use
        return lambda e: (-self.next_use.get(e.session_id, math.inf), e.last_access_s)
