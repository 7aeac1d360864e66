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
    thread reads them; a server's thread may read one (`read`), add it or let names go (`forget`),
    and a read under way meanwhile is not kept. Each name's fingerprints, every one it has served
    here, stay known, so its conversations can be forgotten after it changes."""

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
        self._generation: dict[str, int] = {}  # each name's forget count: a read begun before one is not kept
        self._fingerprints: dict[str, set[str]] = {}
        self._lock = threading.Lock()  # (held for the tables only: files are read outside it)

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
            adapter, generation = self._alive.get(key), self._generation.get(request.lora_name, 0)
        if adapter is None:
            adapter = self.read(request)
        with self._lock:
            if self._generation.get(request.lora_name, 0) == generation:  # (else: replaced meanwhile)
                self._keep(key, adapter)
            else:  # (served all the same, to the request that asked: its conversation's KV keyed by it)
                self._fingerprints.setdefault(request.lora_name, set()).add(adapter.fingerprint)
        return adapter

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """`request`'s adapter read from its folder (or a model id in the local cache), not kept."""
        folder = local_model_path(request.path, what=f"LoRA adapter {request.lora_name!r}")  # (read_adapter: a folder?)
        adapter = read_adapter(request.lora_name, folder, self.spec, self.shapes, self.config.max_lora_rank,
                               self.dtype, self.device)  # fmt: skip
        log.info("LoRA adapter %r read from %s: rank %d, %d layers", adapter.name, adapter.path, adapter.rank,
                 len(adapter.weights))  # fmt: skip
        return adapter

    def replace(self, request: LoRARequest, adapter: LoRAAdapter) -> None:
        """Let every adapter of `request`'s name go, and keep `adapter` (read by `read`) as its."""
        with self._lock:
            self._forget(request.lora_name)
            self._keep((request.lora_name, request.path), adapter)

    def forget(self, name: str) -> None:
        """Let every adapter of this name go (its files may have changed: the next use reads them)."""
        with self._lock:
            self._forget(name)

    def fingerprints(self, name: str) -> set[str]:
        """The fingerprints of every adapter this name has named here."""
        with self._lock:
            return set(self._fingerprints.get(name, ()))

    def loaded(self) -> list[LoRAAdapter]:
        with self._lock:
            return list(self._loaded.values())

    def _keep(self, key: tuple[str, str], adapter: LoRAAdapter) -> None:
        """(under the lock) Keep `adapter`, letting the least recently used go past the limit."""
        self._loaded[key] = self._alive[key] = adapter
        self._fingerprints.setdefault(key[0], set()).add(adapter.fingerprint)
        while len(self._loaded) > self.config.kept_loaded:
            self._loaded.popitem(last=False)

    def _forget(self, name: str) -> None:
        self._generation[name] = self._generation.get(name, 0) + 1
        for table in (self._loaded, self._alive):
            for key in [key for key in table if key[0] == name]:
                del table[key]


def kv_salt(cache_salt: str | None, fingerprint: str | None) -> str | None:
    """The salt a request's KV is keyed by: its own cache salt, and its adapter's fingerprint when it
    has one (an adapter's KV is another model's: never shared with the base model's or another
    adapter's). A client's salt holds no NUL (the engine refuses one), so none equals these."""
    if fingerprint is None:
        return cache_salt
    digest = hashlib.sha256(f"{fingerprint}\0{cache_salt or ''}".encode()).hexdigest()
    return f"\0lora\0{digest}"
