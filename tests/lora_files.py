"""PEFT LoRA adapters written by PEFT itself over the tiny models, with the PEFT model as reference."""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def write_adapter(base: Path, folder: Path, targets: list[str] | str, r: int = 4, seed: int = 1, **config):
    """A LoRA adapter of rank r on `targets` (PEFT's target_modules) over the model saved in `base`,
    its B matrices random (PEFT starts them at zero: such an adapter would change nothing), saved by
    PEFT into `folder`; the PEFT model, in eval mode, as the reference."""
    import transformers
    from peft import LoraConfig, get_peft_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # (a copy PEFT may wrap)
    peft = get_peft_model(hf, LoraConfig(r=r, lora_alpha=config.pop("lora_alpha", 2 * r), target_modules=targets,
                                         lora_dropout=0.0, **config))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in peft.named_parameters():
            if "lora_" in name:  # A as well: each adapter its own
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    peft.save_pretrained(folder)
    return peft.eval()


def hand_written_adapter(folder: Path, pairs: dict[str, tuple[int, int]], r: int = 4, alpha: float = 8,
                         seed: int = 5) -> None:  # fmt: skip
    """An adapter in PEFT's layout written without PEFT (where PEFT will not target the modules of
    these models: a mixture's experts, its router; or where PEFT is not installed: a GPU machine):
    `pairs` gives each module's (out, in)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                            "target_modules": sorted({m.rsplit(".", 1)[1] for m in pairs})}))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_features, in_features) in pairs.items():
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_features, generator=gen) * 0.1
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * 0.1
    save_file(state, str(folder / "adapter_model.safetensors"))


def merged_checkpoint(base: Path, adapter: Path, out: Path) -> Path:
    """A copy of the checkpoint in `base` with the adapter's W + alpha / r * B A merged into each
    weight it names (plain LoRA, names as the checkpoint's): what the adapter computes, as one model."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    config = json.loads((adapter / "adapter_config.json").read_text())
    pairs = load_file(adapter / "adapter_model.safetensors")
    state = load_file(out / "model.safetensors")
    for key, a in pairs.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            b = pairs[key.replace(".lora_A.", ".lora_B.")]
            weight = state[f"{module}.weight"]
            state[f"{module}.weight"] = weight + (config["lora_alpha"] / a.shape[0]) * (b.float() @ a.float())
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def llama_adapter_pairs(config, layers: list[int]) -> dict[str, tuple[int, int]]:
    """Every attention and MLP projection of these layers of a Llama-shaped config: (out, in) by name."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
              "mlp.down_proj": (h, inter)}  # fmt: skip
    return {f"model.layers.{i}.{name}": shape for i in layers for name, shape in shapes.items()}
