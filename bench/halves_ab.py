"""A bfloat16 Hugging Face checkpoint served on a CPU in float32, its weights held as float32 copies
(before) or as their 16-bit values the few-rows kernel reads (after): the bytes its weights hold,
peak RSS, a 1,024-token prompt's prefill and a decode step, each way in its own process, the ways
alternated. Random weights of a named shape (bench/shapes.py), written once as bfloat16:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/halves_ab.py [shape] [rounds] [folder]
"""

import json
import resource
import subprocess
import sys
from pathlib import Path


def write_checkpoint(shape: str, folder: Path) -> None:
    import torch
    import transformers

    from cachedattention.bench.shapes import SHAPES

    fields = dict(SHAPES[shape])
    cfg = transformers.AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.save_pretrained(folder)


def measure(folder: Path, halves: bool) -> dict:
    from cachedattention import LLM
    from cachedattention.bench.timing import prefill_and_decode_s
    from cachedattention.model import loader

    if not halves:  # (the way before: float32 copies of every weight)
        loader.hold_as_halves, loader._take_halves = (lambda model: 0), (lambda model, state: {})
    llm = LLM(model=str(folder), max_model_len=4096)
    loaded_mb = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1e6
    model = llm.engine.model
    floats = sum(s.nbytes() for s in {p.untyped_storage().data_ptr(): p.untyped_storage() for p in model.parameters()}.values())
    blocks = {m.quantized.quants.data_ptr(): m.quantized.quants for m in model.modules() if getattr(m, "blocks_only", False)}
    held = sum(q.numel() * 2 for q in blocks.values())  # (a tied head's are the embedding's)
    vocab = llm.engine.spec.vocab_size
    prefill, decode, tokens = prefill_and_decode_s(llm, [(7 * i + 3) % (vocab - 200) + 100 for i in range(1024)])
    return {"float32_mb": floats / 1e6, "halves_mb": held / 1e6, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_mb": loaded_mb,
            "prefill_ms": prefill * 1000, "decode_ms": decode * 1000, "tokens": tokens}  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(Path(sys.argv[2]), sys.argv[3] == "halves")))
        return
    shape = sys.argv[1] if len(sys.argv) > 1 else "llama-110m"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    folder = Path(sys.argv[3] if len(sys.argv) > 3 else f"/tmp/halves-ab-{shape}")
    if not (folder / "config.json").exists():
        write_checkpoint(shape, folder)
    print(f"{shape}, bfloat16 checkpoint in {folder}")
    for _ in range(rounds):
        for way in ("float32", "halves"):
            run = subprocess.run([sys.executable, __file__, "--measure", str(folder), way], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{way:8} weights {r['float32_mb']:.0f} MB float32 + {r['halves_mb']:.0f} MB 16-bit; "
                  f"RSS {r['loaded_mb']:.0f} MB once loaded, peak {r['rss_mb']:.0f} MB; prefill of 1024: {r['prefill_ms']:.0f} ms; "
                  f"decode: {r['decode_ms']:.1f} ms a token; first tokens {r['tokens']}")  # fmt: skip


if __name__ == "__main__":
    main()
