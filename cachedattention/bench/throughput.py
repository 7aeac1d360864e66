"""`bench --mode throughput`: prefill and decode tokens/s of our engine next to transformers' generate().

Same model weights, same prompts, same run. Prefill: every prompt to its first token. Decode:
the extra time to generate `decode` more tokens, per generated token. Both batched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cachedattention.bench.models import bench_model
from cachedattention.bench.timing import median_time
from cachedattention.config import CacheConfig, EngineConfig, SchedulerConfig
from cachedattention.llm import LLM
from cachedattention.sampling import SamplingParams


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    return [[(31 * i + 7 * j) % (vocab - 200) + 100 for j in range(length)] for i in range(n)]


def _ours(loaded, args, prompts: list[list[int]], new: int) -> float:
    cfg = EngineConfig(
        device=args.device, dtype=args.dtype, max_model_len=len(prompts[0]) + new + 16,
        cache=CacheConfig(enable_prefix_cache=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=len(prompts)),
    )
    llm = LLM.from_config(cfg, loaded=loaded)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    return median_time(lambda: llm.generate(prompts, params, use_tqdm=False), args.repeats, args.device)


def _hf_model(loaded, device: str, dtype: str):
    """transformers' model of the same family with exactly our weights (same state dict names)."""
    import transformers

    s = loaded.spec  # RoPE scaling left out: it changes no timing
    family = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}.get(s.model_type)  # fmt: skip
    # (transformers 5 fuses a mixture's experts into other tensors than ours; Gemma's weights are folded here)
    if family is None or s.moe is not None or s.window_layers:
        raise ValueError(f"the throughput bench's transformers reference takes dense Llama, Mistral and Qwen models "
                         f"without a sliding window, not {s.model_type}'s; measure it with --mode turn or --mode workload")
    cfg = family(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        head_dim=s.head_dim, rms_norm_eps=s.rms_norm_eps, rope_theta=s.rope_theta,
        max_position_embeddings=s.max_position_embeddings, tie_word_embeddings=s.tie_word_embeddings,
        attention_bias=s.qkv_bias,
    )
    cfg.dtype = dtype
    with torch.device(device):  # built where it runs: its rotary buffers must be real tensors
        hf = transformers.AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype))
    state = loaded.model.state_dict()
    for name, module in loaded.model.named_modules():  # a GGUF's layers held only as blocks: their values
        if getattr(module, "blocks_only", False):
            state[f"{name}.weight"] = module.quantized.dequantize()
    missing, _ = hf.load_state_dict(state, strict=False)
    if set(missing) - {"lm_head.weight"}:  # a tied head comes with tie_weights below
        raise ValueError(f"the transformers reference lacks our weights for {sorted(missing)[:3]}")
    hf.tie_weights()
    return hf.eval()


def _hf(hf, args, prompts: list[list[int]], new: int) -> float:
    ids = torch.tensor(prompts, device=args.device)

    def run():
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)

    return median_time(run, args.repeats, args.device)


def run_throughput_bench(args: argparse.Namespace) -> int:
    loaded = bench_model(args)
    batch, length, decode = (4, 256, 32) if args.quick else (8, 512, 64)
    prompts = _prompts(batch, length, loaded.spec.vocab_size)
    hf = _hf_model(loaded, args.device, args.dtype)
    rows = {}
    for name, fn in (("cachedattention", lambda n: _ours(loaded, args, prompts, n)),
                     ("transformers", lambda n: _hf(hf, args, prompts, n))):
        fn(1)  # warm-up
        prefill_s = fn(1)
        total_s = fn(1 + decode)
        rows[name] = {
            "prefill_tok_s": batch * length / prefill_s,
            "decode_tok_s": batch * decode / max(total_s - prefill_s, 1e-9),
            "prefill_s": prefill_s,
            "total_s": total_s,
        }
    ours, ref = rows["cachedattention"], rows["transformers"]
    print(f"Throughput ({loaded.name}, {args.device}, {args.dtype}; {batch} prompts x {length} tokens, "
          f"{decode} decode tokens each; median of {args.repeats})\n")
    print("| engine | prefill tok/s | decode tok/s |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} |")
    print(f"| ratio (ours / transformers) | {ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x "
          f"| {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": loaded.name, "batch": batch, "prompt_len": length,
                                               "decode": decode, "engines": rows}, indent=2))
    return 0
