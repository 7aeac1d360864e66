"""AttentionStore: every conversation's KV across turns in host and disk tiers, with layer-wise transfer."""
