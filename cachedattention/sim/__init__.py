"""Trace-driven simulator of the store's cache policies (no model: KV bytes = tokens x bytes/token)."""

from cachedattention.sim.simulator import SimConfig, SimResult, simulate, sweep
from cachedattention.sim.trace import TraceTurn, trace_from_workload, trace_kv_bytes

__all__ = ["SimConfig", "SimResult", "TraceTurn", "simulate", "sweep", "trace_from_workload", "trace_kv_bytes"]
