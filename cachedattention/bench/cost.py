"""Serving cost model from the CachedAttention paper: GPU time plus provisioned cache storage."""

from __future__ import annotations

from dataclasses import asdict, dataclass

GB = 1e9  # the paper prices storage per decimal GB

COST_FORMULA = (
    "cost_usd = compute_s/3600 * gpu_usd_per_h"
    " + host_bytes/1e9 * wall_s/3600 * dram_usd_per_gb_h"
    " + disk_bytes/1e9 * wall_s/3600 * ssd_usd_per_gb_h"
    "  (defaults: GPU $5/h, DRAM $0.0088/GB/h, SSD $0.000082/GB/h)"
)


@dataclass(frozen=True)
class Prices:
    gpu_usd_per_h: float = 5.0
    dram_usd_per_gb_h: float = 0.0088
    ssd_usd_per_gb_h: float = 0.000082

    def __post_init__(self) -> None:
        if min(self.gpu_usd_per_h, self.dram_usd_per_gb_h, self.ssd_usd_per_gb_h) < 0:
            raise ValueError(f"prices must be >= 0, got {self}")


DEFAULT_PRICES = Prices()  # the paper's prices (frozen, so safe to share)


@dataclass(frozen=True)
class CostBreakdown:
    gpu_usd: float
    dram_usd: float
    ssd_usd: float

    @property
    def total_usd(self) -> float:
        return self.gpu_usd + self.dram_usd + self.ssd_usd

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total_usd": self.total_usd}


def serving_cost(
    compute_s: float,
    host_bytes: float,
    disk_bytes: float,
    wall_s: float,
    prices: Prices = DEFAULT_PRICES,
) -> CostBreakdown:
    """Cost of a run: GPU billed for compute time, host/disk cache billed for capacity x wall time."""
    for name, value in (
        ("compute_s", compute_s),
        ("host_bytes", host_bytes),
        ("disk_bytes", disk_bytes),
        ("wall_s", wall_s),
    ):
        if not value >= 0:  # also rejects NaN
            raise ValueError(f"serving_cost: {name} must be >= 0, got {value}")
    hours = wall_s / 3600
    return CostBreakdown(
        gpu_usd=compute_s / 3600 * prices.gpu_usd_per_h,
        dram_usd=host_bytes / GB * hours * prices.dram_usd_per_gb_h,
        ssd_usd=disk_bytes / GB * hours * prices.ssd_usd_per_gb_h,
    )
