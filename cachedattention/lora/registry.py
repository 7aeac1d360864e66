"""The engine's loaded LoRA adapters: read on first use, the least recently used let go past the limit."""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict

import torch

from cachedattention.config import LoRAConfig
from cachedattention.lora.adapter import LoRAAdapter, read_adapter
from cachedattention.lora.request import LoRARequest
from cachedattention.model.hub_cache import local_model_path
from cachedattention.model.spec import ModelSpec

log = logging.getLogger(__name__)


class LoRARegistry:
    """Adapters by (name, folder), at most `config.kept_loaded` of them kept (a request holds its own
    adapter while it waits and runs, so letting one go never pulls it from under a request; and one
    let go while requests still hold it is found again, not read into a second copy). The engine's
    thread reads them; a server's thread may read one (`read`), add it or let names go."""

    def __init__(self, config: LoRAConfig, spec: ModelSpec, shapes: dict[str, tuple[int, int]],
                 dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
        self.config = config
        self.spec = spec
        self.shapes = shapes
        self.dtype = dtype
        self.device = device
        self._loaded: OrderedDict[tuple[str, str], LoRAAdapter] = OrderedDict()
        # every adapter some request (or the table above) still holds
        self._alive: weakref.WeakValueDictionary[tuple[str, str], LoRAAdapter] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()  # (held for the table only: files are read outside it)

    def adapter(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter `request` names, read from its folder (or a Hugging Face id in the local cache)
        unless already loaded; a ValueError saying why one cannot be served."""
        if not isinstance(request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        key = (request.lora_name, request.path)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            adapter = self._alive.get(key)
        if adapter is None:
            adapter = self.read(request)
        self.add(request, adapter)
        return adapter

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """`request`'s adapter read from its folder (or a model id in the local cache), not kept."""
        folder = local_model_path(request.path, what=f"LoRA adapter {request.lora_name!r}")  # (read_adapter: a folder?)
        adapter = read_adapter(request.lora_name, folder, self.spec, self.shapes, self.config.max_lora_rank,
                               self.dtype, self.device)  # fmt: skip
        log.info("LoRA adapter %r read from %s: rank %d, %d layers", adapter.name, adapter.path, adapter.rank,
                 len(adapter.weights))  # fmt: skip
        return adapter

    def add(self, request: LoRARequest, adapter: LoRAAdapter) -> None:
        """Keep `adapter` as `request`'s, letting the least recently used go past the limit."""
        with self._lock:
            self._loaded[(request.lora_name, request.path)] = self._alive[(request.lora_name, request.path)] = adapter
            while len(self._loaded) > self.config.kept_loaded:
                self._loaded.popitem(last=False)

    def forget(self, name: str) -> None:
        """Let every adapter of this name go (its files may have changed: the next use reads them)."""
        with self._lock:
            for table in (self._loaded, self._alive):
                for key in [key for key in table if key[0] == name]:
                    del table[key]

    def loaded(self) -> list[LoRAAdapter]:
        with self._lock:
            return list(self._loaded.values())


def kv_salt(cache_salt: str | None, adapter: LoRAAdapter | None) -> str | None:
    """The salt a request's KV is keyed by: its own cache salt, and its adapter's fingerprint when it
    has one (an adapter's KV is another model's: never shared with the base model's or another
    adapter's). A client's salt holds no NUL (the engine refuses one), so none equals these."""
    if adapter is None:
        return cache_salt
    digest = hashlib.sha256(f"{adapter.fingerprint}\0{cache_salt or ''}".encode()).hexdigest()
    return f"\0lora\0{digest}"
