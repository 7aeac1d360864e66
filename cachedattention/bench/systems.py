"""The serving systems the workload benchmark compares, as engine configurations over shared tier budgets.

RE recomputes every turn; device-only keeps a prefix cache in the device pool (vLLM/SGLang's
default); device+host adds the store's host tier; CachedAttention adds the disk tier with the
look-ahead policy; lru and fifo are CachedAttention with those eviction policies instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cachedattention.bench.workload import Workload
from cachedattention.config import CacheConfig, EngineConfig, StoreConfig

SYSTEM_NAMES = ("RE", "device-only", "device+host", "CachedAttention", "lru", "fifo")
_STORE_POLICIES = {"CachedAttention": "lookahead", "lru": "lru", "fifo": "fifo"}

# Fractions of the workload's total KV given to each tier: no tier but disk can hold every session,
# so the hierarchy (and the eviction policy) is exercised, as in the paper's setting.
DEVICE_FRACTION = 0.25
HOST_FRACTION = 0.5
DISK_FRACTION = 2.0


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

    @property
    def billed_host_bytes(self) -> int:
        """Provisioned host DRAM for the cost (0 when the store is off)."""
        return self.store.host_bytes if self.store.enable else 0

    @property
    def billed_disk_bytes(self) -> int:
        return self.store.disk_bytes if self.store.enable and self.store.store_dir else 0

    def engine_config(self, base: EngineConfig) -> EngineConfig:
        return replace(base, cache=self.cache, store=self.store)


def parse_system_names(text: str | None) -> tuple[str, ...]:
    """`--systems RE,CachedAttention` -> names in the canonical order; None or '' -> all."""
    if not text:
        return SYSTEM_NAMES
    wanted = [n.strip() for n in text.split(",") if n.strip()]
    lower = {n.lower(): n for n in SYSTEM_NAMES}
    unknown = [n for n in wanted if n.lower() not in lower]
    if unknown or not wanted:
        raise ValueError(f"unknown systems {unknown or [text]}; choose from {', '.join(SYSTEM_NAMES)}")
    chosen = {lower[n.lower()] for n in wanted}
    return tuple(n for n in SYSTEM_NAMES if n in chosen)


def build_systems(
    names: Sequence[str], budgets: Budgets, store_root: str | Path, page_size: int = 16
) -> list[SystemSpec]:
    """One SystemSpec per name; each disk-tier system gets its own fresh folder under `store_root`."""
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
        elif name in _STORE_POLICIES:
            folder = Path(store_root) / name
            folder.mkdir(parents=True, exist_ok=True)
            store = StoreConfig(
                enable=True,
                store_dir=str(folder),
                host_bytes=budgets.host_bytes,
                disk_bytes=budgets.disk_bytes,
                policy=_STORE_POLICIES[name],
            )
            out.append(SystemSpec(name, device, store))
        else:
            raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEM_NAMES)}")
    return out


def session_tokens(workload: Workload, head_tokens: int, per_turn_tokens: int) -> list[int]:
    """Estimated prompt + answer tokens of each session at its last turn (its whole KV)."""
    return [
        head_tokens + sum(t.user_tokens + t.answer_tokens + per_turn_tokens for t in s.turns) for s in workload.sessions
    ]
