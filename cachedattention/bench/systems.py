"""The serving systems the workload benchmark compares, as engine configurations over shared tier budgets.

RE recomputes every turn; device-only keeps a prefix cache in the device pool (vLLM/SGLang's
default); device+host adds the store's host tier; CachedAttention adds the disk tier with the
look-ahead policy; lru and fifo are CachedAttention with those eviction policies instead.
Only when named: "replicas" is CachedAttention on several replicas (each with the budgets above)
behind a load balancer that does not keep a conversation on one replica; "replicas+remote" adds
the remote tier they share (`--remote-url`); "replicas+router" places turns as `cachedattention
router` does: each session on one replica (rendezvous hashing with bounded loads), and
"replicas+router+remote" adds the shared remote tier to that (what a turn moved off its replica
takes from there).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cachedattention.bench.workload import Workload
from cachedattention.config import CacheConfig, EngineConfig, StoreConfig

SYSTEM_NAMES = ("RE", "device-only", "device+host", "CachedAttention", "lru", "fifo")
# run only when named (those with +remote need a server)
REPLICA_NAMES = ("replicas", "replicas+remote", "replicas+router", "replicas+router+remote")
_STORE_POLICIES = {"CachedAttention": "lookahead", "lru": "lru", "fifo": "fifo"}

# Fractions of the workload's total KV given to each tier: no tier but disk can hold every session,
# so the hierarchy (and the eviction policy) is exercised, as in the paper's setting.
DEVICE_FRACTION = 0.25
HOST_FRACTION = 0.5
DISK_FRACTION = 2.0


PAGE_SIZE = 16  # tokens per page of every system's device pool


@dataclass(frozen=True)
class Budgets:
    """Byte budgets of the device pool, the host tier and the disk tier, shared by every system."""

    device_bytes: int
    host_bytes: int
    disk_bytes: int
    total_kv_bytes: int  # estimated KV of every session at its last turn

    @classmethod
    def for_workload(cls, total_kv_bytes: int, largest_session_kv_bytes: int) -> Budgets:
        if total_kv_bytes <= 0 or largest_session_kv_bytes <= 0:
            raise ValueError("the workload's KV size must be positive to size the tiers")
        # the device pool must still fit the longest request (plus pages for a few others) to run at all
        device = max(int(total_kv_bytes * DEVICE_FRACTION), largest_session_kv_bytes * 3 // 2)
        host = max(int(total_kv_bytes * HOST_FRACTION), largest_session_kv_bytes)
        disk = max(int(total_kv_bytes * DISK_FRACTION), 2 * host)
        return cls(device, host, disk, total_kv_bytes)


@dataclass(frozen=True)
class SystemSpec:
    name: str
    cache: CacheConfig
    store: StoreConfig
    replicas: int = 1  # engines, each with these budgets (and its own disk folder)
    routing: str = "random"  # how turns find a replica: "random" (per turn) or "affinity" (the router's)

    @property
    def billed_host_bytes(self) -> int:
        """Provisioned host DRAM for the cost (0 when the store is off), every replica's."""
        return self.replicas * self.store.host_bytes if self.store.enable else 0

    @property
    def billed_disk_bytes(self) -> int:
        return self.replicas * self.store.disk_bytes if self.store.enable and self.store.store_dir else 0

    def engine_configs(self, base: EngineConfig) -> list[EngineConfig]:
        """One config per replica; replicas' disk tiers in their own subfolders."""
        if self.replicas == 1:
            return [replace(base, cache=self.cache, store=self.store)]
        configs = []
        for i in range(self.replicas):
            folder = Path(self.store.store_dir) / f"replica-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            configs.append(replace(base, cache=self.cache, store=replace(self.store, store_dir=str(folder))))
        return configs


def parse_system_names(text: str | None) -> tuple[str, ...]:
    """`--systems RE,CachedAttention` -> names in the canonical order; None or '' -> all."""
    if not text:
        return SYSTEM_NAMES
    wanted = [n.strip() for n in text.split(",") if n.strip()]
    known = SYSTEM_NAMES + REPLICA_NAMES
    lower = {n.lower(): n for n in known}
    unknown = [n for n in wanted if n.lower() not in lower]
    if unknown or not wanted:
        raise ValueError(f"unknown systems {unknown or [text]}; choose from {', '.join(known)}")
    chosen = {lower[n.lower()] for n in wanted}
    return tuple(n for n in known if n in chosen)


def build_systems(
    names: Sequence[str],
    budgets: Budgets,
    store_root: str | Path,
    page_size: int = PAGE_SIZE,
    replicas: int = 2,
    remote_url: str | None = None,
) -> list[SystemSpec]:
    """One SystemSpec per name; each disk-tier system gets its own fresh folder under `store_root`.
    The +remote systems need `remote_url`; their keys get a namespace of their own for this run."""
    if replicas < 2 and any(n in REPLICA_NAMES for n in names):
        raise ValueError(f"--replicas must be >= 2 for {', '.join(REPLICA_NAMES)}, got {replicas}")
    if any(n.endswith("+remote") for n in names) and not remote_url:
        raise ValueError("the +remote replica systems need --remote-url (a Redis-protocol server)")
    device = CacheConfig(page_size=page_size, memory_bytes=budgets.device_bytes)
    off = StoreConfig(enable=False)
    out = []
    for name in names:
        if name == "RE":
            out.append(SystemSpec(name, replace(device, enable_prefix_cache=False), off))
        elif name == "device-only":
            out.append(SystemSpec(name, device, off))
        elif name == "device+host":
            out.append(SystemSpec(name, device, StoreConfig(enable=True, host_bytes=budgets.host_bytes)))
        elif name in _STORE_POLICIES or name in REPLICA_NAMES:
            folder = Path(store_root) / name
            folder.mkdir(parents=True, exist_ok=True)
            store = StoreConfig(
                enable=True,
                store_dir=str(folder),
                host_bytes=budgets.host_bytes,
                disk_bytes=budgets.disk_bytes,
                policy=_STORE_POLICIES.get(name, "lookahead"),
            )
            if name.endswith("+remote"):  # a fresh namespace: an earlier run's sessions are not this run's
                store = replace(store, remote_url=remote_url, remote_namespace=f"bench-{uuid.uuid4().hex[:12]}")
            routing = "affinity" if "+router" in name else "random"
            out.append(SystemSpec(name, device, store, replicas if name in REPLICA_NAMES else 1, routing))
        else:
            raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEM_NAMES + REPLICA_NAMES)}")
    return out


def session_tokens(workload: Workload, head_tokens: int, per_turn_tokens: int) -> list[int]:
    """Estimated prompt + answer tokens of each session at its last turn (its whole KV)."""
    return [
        head_tokens + sum(t.user_tokens + t.answer_tokens + per_turn_tokens for t in s.turns) for s in workload.sessions
    ]
