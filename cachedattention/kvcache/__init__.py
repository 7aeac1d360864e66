"""Paged device KV memory: the page allocator, the KV tensors and prefix block hashes."""
