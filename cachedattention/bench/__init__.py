"""Multi-turn benchmark: workloads, metrics, cost model and reports (engine independent)."""
