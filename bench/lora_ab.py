"""What a LoRA adapter costs on the embedded model (SmolLM2-135M, CPU, float32): one engine, the same
prompts with and without a rank-R adapter on every attention and MLP projection of every layer,
the ways alternated in each round. A 512-token prompt's time to first token; one request's decode
steps (the base model's run through the fused C decode layers, the adapter's layer by layer); and
8 requests decoding together, none, half or all of them with the adapter. Same answers checked
against a second run of each way.

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/lora_ab.py [rank] [rounds]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path


def write_adapter(folder: Path, spec, rank: int) -> None:
    import json

    import torch
    from safetensors.torch import save_file

    h, inter, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    shapes = {"self_attn.q_proj": (spec.num_heads * d, h), "self_attn.k_proj": (spec.num_kv_heads * d, h),
              "self_attn.v_proj": (spec.num_kv_heads * d, h), "self_attn.o_proj": (h, spec.num_heads * d),
              "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(spec.num_layers):
        for name, (out_features, in_features) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * 0.02
            state[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}))


def main() -> None:
    from cachedattention import LLM, LoRARequest, SamplingParams

    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    llm = LLM(enable_lora=True, max_lora_rank=rank, enable_prefix_caching=False, max_num_batched_tokens=1024)
    folder = Path(tempfile.mkdtemp()) / "adapter"
    write_adapter(folder, llm.engine.spec, rank)
    lora = LoRARequest("bench", 1, str(folder))
    long_prompt = [(7 * i) % 40000 + 100 for i in range(512)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    decode = SamplingParams(max_tokens=65, temperature=0, ignore_eos=True)
    prompts = [[(11 * i + j) % 40000 + 100 for i in range(32)] for j in range(8)]
    mixes = {"none": [None] * 8, "half": [lora, None] * 4, "all": [lora] * 8}
    llm.generate([prompts[0]], decode, lora_request=lora, use_tqdm=False)  # (warm: kernels, the adapter read)
    times: dict[str, list[float]] = {}
    answers: dict[str, list] = {}

    def timed(key: str, run) -> None:
        t = time.perf_counter()
        outs = run()
        times.setdefault(key, []).append(time.perf_counter() - t)
        tokens = [o.token_ids for o in outs]
        if answers.setdefault(key, tokens) != tokens:
            raise SystemExit(f"{key}: another answer than the first round's")

    for _ in range(rounds):
        for name, r in (("base", None), ("lora", lora)):
            timed(f"prefill 512 {name}", lambda r=r: llm.generate([long_prompt], one, lora_request=r, use_tqdm=False))
            timed(f"decode 1x64 {name}", lambda r=r: llm.generate([prompts[1]], decode, lora_request=r, use_tqdm=False))
        for name, mix in mixes.items():
            timed(f"decode 8x64 {name}", lambda mix=mix: llm.generate(prompts, decode, lora_request=mix, use_tqdm=False))
    print(f"rank {rank}, {rounds} rounds, medians (each round's times in brackets)")
    print("| run | base | with the adapter | ratio |\n|---|---|---|---|")
    for key, base, other in (("prefill 512", "base", "lora"), ("decode 1x64", "base", "lora"),
                             ("decode 8x64", "none", "half"), ("decode 8x64", "none", "all")):  # fmt: skip
        a, b = times[f"{key} {base}"], times[f"{key} {other}"]
        steps = 64 if key.startswith("decode") else 1  # (a decode run: its prompt's step, then 64 decode steps)
        unit, scale = ("ms/step", 1000 / steps) if steps > 1 else ("ms", 1000)
        each = lambda xs, scale=scale: ", ".join(f"{x * scale:.1f}" for x in xs)  # noqa: E731
        label = key if other == "lora" else f"{key} ({other} of the 8 with it)"
        print(f"| {label} ({unit}) | {statistics.median(a) * scale:.1f} [{each(a)}] | "
              f"{statistics.median(b) * scale:.1f} [{each(b)}] | {statistics.median(b) / statistics.median(a):.2f} |")


if __name__ == "__main__":
    main()
