"""The random-weight shapes a benchmark may run (`--random-shape`): Hugging Face config fields."""

SHAPES = {
    # Llama-3-8B: the shape of DESIGN.md's measured anchors
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
    # Llama-3.2-1B: a small real model's shape, its 128k vocabulary half its parameters
    "llama3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    # ~110M parameters, long window: CPU runs with histories beyond the embedded model's comfort
    "llama-110m": dict(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,  # the turn bench's 32k history fits
    ),
    # the same size with Gemma 3's layers: five of every six see the last 512 keys only, the sixth all
    "gemma3-110m": dict(
        model_type="gemma3_text", vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64, sliding_window=512,
        sliding_window_pattern=6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-6,
    ),
}
