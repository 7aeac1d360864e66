"""The memory and speed of a quantized GGUF model served on a CPU: a 110M Llama shape (12 layers,
hidden 768, MLP 2048) whose decoder layers, embedding and head are Q4_K_M's mix of K-quants (random
super-blocks), written once. Prints the bytes its weights hold (float32 tensors and blocks), the process's peak
RSS, a 1,024-token prompt's prefill and a decode step. A diagnostic: to compare two versions of the
code, alternate runs with PYTHONPATH pointing at each checkout (run from this repository's root:
it writes the file with the tests' GGUF writer):

    CACHEDATTENTION_HOME=/tmp/cahome PYTHONPATH=/path/to/checkout .venv/bin/python bench/gguf_memory_ab.py [folder]
"""

import resource
import sys
from pathlib import Path

import torch

TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
         "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q4_K", "output": "Q6_K"}  # fmt: skip
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)  # fmt: skip


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the float32 tensors, bytes of the GGUF blocks) the model holds, each storage once."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    blocks = 0
    for m in model.modules():
        q = getattr(m, "quantized", None)
        if q is not None:
            blocks += sum(t.numel() * t.element_size() for t in (q.quants, q.scales, q.mins) if t is not None)
    return sum(storages.values()), blocks


def main(folder: Path) -> None:
    path = folder / "model.gguf"
    if not path.exists():
        sys.path.append(str(Path(__file__).resolve().parents[1]))  # (after PYTHONPATH: the code compared)
        from tests.gguf_files import write_tiny_gguf

        folder.mkdir(parents=True, exist_ok=True)
        write_tiny_gguf("llama", folder, TYPES, **SHAPE)
    from cachedattention import LLM
    from cachedattention.bench.timing import prefill_and_decode_s

    llm = LLM(model=str(path), max_model_len=4096)
    floats, blocks = weight_bytes(llm.engine.model)
    prefill, decode, _ = prefill_and_decode_s(llm, [(7 * i + 3) % 40000 + 100 for i in range(1024)])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"weights: {floats / 1e6:.1f} MB float32 + {blocks / 1e6:.1f} MB blocks; peak RSS {rss:.0f} MB; "
          f"prefill of 1024: {prefill * 1000:.0f} ms; decode: {decode * 1000:.1f} ms a token")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gguf-memory-ab"))
