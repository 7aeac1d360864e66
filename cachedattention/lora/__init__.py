"""LoRA adapters served beside the base model: vLLM's LoRARequest, PEFT adapter folders read into
our module layout, and the per-step grouping of rows by adapter that the linear layers add from."""
