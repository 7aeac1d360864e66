"""A quantized checkpoint served on a CPU from the few-rows kernel's blocks (AutoAWQ's 4 bits in groups
of 32 as Q4_1; FP8 with Qwen3's blocks of 128 x 128 as F8), against a float32 checkpoint of the same
values: the bytes its weights hold, RSS once loaded, after the run and at peak, a 1,024-token prompt's
prefill and a decode step, each in its own process, the two alternated. Random weights of a named
shape (bench/shapes.py), written once:

    CACHEDATTENTION_HOME=/tmp/cahome .venv/bin/python bench/quantized_ab.py [awq|fp8] [shape] [rounds] [folder]
"""

import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # (tests.quantized_files: the writers)
WRITERS = {"awq": ("int4_packed_weights", "INT4_SCHEMES", "awq"), "fp8": ("fp8_packed_weights", "FP8_SCHEMES", "fp8-blocks-128")}


def write_checkpoints(method: str, shape: str, folder: Path) -> None:
    import torch
    import transformers
    from safetensors.torch import save_file

    from cachedattention.bench.shapes import SHAPES
    from tests import quantized_files

    fields = dict(SHAPES[shape])
    cfg = transformers.AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    model.save_pretrained(folder / "float32")
    plain = {k: v.contiguous() for k, v in model.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    writer, schemes, scheme = WRITERS[method]
    weights, values = getattr(quantized_files, writer)(plain, scheme)
    quant = getattr(quantized_files, schemes)[scheme]
    save_file({**plain, **values}, str(folder / "float32" / "model.safetensors"), metadata={"format": "pt"})
    (folder / method).mkdir()
    save_file(weights, str(folder / method / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "float32" / "config.json").read_text())
    quant = quant[0] if isinstance(quant, tuple) else quant  # (an FP8 scheme: its config and how it writes)
    (folder / method / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))


def measure(folder: Path) -> dict:
    from cachedattention import LLM
    from cachedattention.bench.timing import prefill_and_decode_s

    llm = LLM(model=str(folder), max_model_len=4096)
    loaded_mb = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1e6
    model = llm.engine.model
    floats = sum(s.nbytes() for s in {p.untyped_storage().data_ptr(): p.untyped_storage() for p in model.parameters()}.values())
    held = [m.quantized for m in model.modules() if getattr(m, "blocks_only", False)]
    blocks = sum(q.quants.nbytes + q.scales.nbytes + (q.mins.nbytes if q.mins is not None else 0) for q in held)
    vocab = llm.engine.spec.vocab_size
    prefill, decode, tokens = prefill_and_decode_s(llm, [(7 * i + 3) % (vocab - 200) + 100 for i in range(1024)])
    after_mb = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 1e6
    # (VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's at fork, which wrote the checkpoints)
    status = Path("/proc/self/status").read_text().splitlines()
    peak_mb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024 / 1e6
    return {"float32_mb": floats / 1e6, "blocks_mb": blocks / 1e6, "peak_mb": peak_mb, "loaded_mb": loaded_mb,
            "after_mb": after_mb, "prefill_ms": prefill * 1000, "decode_ms": decode * 1000, "tokens": tokens}  # fmt: skip


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(Path(sys.argv[2]))))
        return
    method = sys.argv[1] if len(sys.argv) > 1 else "awq"
    shape = sys.argv[2] if len(sys.argv) > 2 else "llama-110m"
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    folder = Path(sys.argv[4] if len(sys.argv) > 4 else f"/tmp/{method}-ab-{shape}")
    if method not in WRITERS:
        raise SystemExit(f"the method is one of {', '.join(WRITERS)}")
    if not (folder / method / "config.json").exists():
        write_checkpoints(method, shape, folder)
    print(f"{shape}: {method} ({WRITERS[method][2]}) and a float32 checkpoint of the same values, in {folder}")
    for _ in range(rounds):
        for way in ("float32", method):
            run = subprocess.run([sys.executable, __file__, "--measure", str(folder / way)], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{way:8} weights {r['float32_mb']:.0f} MB float32 + {r['blocks_mb']:.0f} MB blocks; "
                  f"RSS {r['loaded_mb']:.0f} MB once loaded, {r['after_mb']:.0f} MB after the run, peak {r['peak_mb']:.0f} MB; "
                  f"prefill of 1024: {r['prefill_ms']:.0f} ms; "
                  f"decode: {r['decode_ms']:.1f} ms a token; first tokens {r['tokens']}")  # fmt: skip


if __name__ == "__main__":
    main()
