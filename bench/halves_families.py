"""Tiny random models of each family saved as bfloat16, served from their 16-bit weights: how many
linear layers (and the embedding) are held so, and the largest relative error of the logits against
transformers loading the same checkpoint in float32. Run from this repository's root:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/halves_families.py [kind ...]
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # (the tests' tiny models)

KINDS = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2-moe", "qwen3-moe", "gemma3", "phi3", "smollm3",
         "granite", "olmo2", "phi4-mini", "gemma", "gemma2", "olmo3", "exaone4", "ernie4_5", "seed_oss", "helium",
         "glm", "glm4", "cohere", "cohere2", "granitemoe", "granitemoeshared", "gpt_oss", "glm4_moe", "qwen2-yarn",
         "llama-biases"]  # fmt: skip
PROMPT = [(11 * i + 5) % 200 + 20 for i in range(40)]


def check(kind: str) -> str:
    from cachedattention import LLM, SamplingParams
    from cachedattention.engine import engine
    from cachedattention.model.layers import Embedding, Linear
    from tests.tiny_models import make_tiny_model
    from tests.util import rel_err

    folder = Path(tempfile.mkdtemp())
    make_tiny_model(kind, folder / "made").to(torch.bfloat16).save_pretrained(folder / "checkpoint")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder / "checkpoint", dtype=torch.float32).eval()
    llm = LLM(model=str(folder / "checkpoint"))
    layers = [m for m in llm.engine.model.modules() if isinstance(m, (Linear, Embedding))]
    seen, real = [], engine.sample_batch

    def spy(logits, *rest):
        seen.extend(row.clone() for row in logits)
        return real(logits, *rest)

    engine.sample_batch = spy
    try:
        out = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    finally:
        engine.sample_batch = real
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([PROMPT + out.token_ids])).logits[0]
    worst = max(rel_err(row, ref[len(PROMPT) - 1 + i]) for i, row in enumerate(seen))
    return f"held {sum(m.blocks_only for m in layers)}/{len(layers)} max rel err {worst:.2e}"


if __name__ == "__main__":
    for kind in sys.argv[1:] or KINDS:
        print(f"{kind:18} {check(kind)}", flush=True)
