"""vLLM's LoRARequest: which adapter a request runs with (by name), and where its folder is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class LoRARequest:
    """As vLLM's: `lora_name` names the adapter (two requests of one name are one adapter),
    `lora_int_id` is its id (at least 1), `lora_path` its PEFT folder (adapter_config.json and
    adapter_model.safetensors or .bin), or a Hugging Face id already in the local cache.
    `lora_local_path` is vLLM's older name for the path; `base_model_name` is informative.
    vLLM's long-context LoRA and tensorizer options are refused."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_local_path: str | None = None
    long_lora_max_len: int | None = None
    base_model_name: str | None = None
    tensorizer_config_dict: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r:.60}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer of at least 1, got {self.lora_int_id!r:.60}")
        if not isinstance(self.lora_path, str) or not isinstance(self.lora_local_path, (str, type(None))):
            raise ValueError("lora_path must be a string (the adapter's folder)")
        if not self.path:
            raise ValueError(f"LoRA adapter {self.lora_name!r} has no lora_path (its PEFT folder)")
        if self.long_lora_max_len is not None:
            raise ValueError("long_lora_max_len (vLLM's long-context LoRA) is not supported")
        if self.tensorizer_config_dict is not None:
            raise ValueError("tensorizer_config_dict is not supported: give the adapter's PEFT folder")

    @property
    def path(self) -> str:
        return self.lora_path or self.lora_local_path or ""

    # vLLM's short names
    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, LoRARequest) and other.lora_name == self.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)
