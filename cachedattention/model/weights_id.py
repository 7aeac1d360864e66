"""The identity of a model's weights, part of the store's model fingerprint: a hash of the files'
contents, so that every copy of the same weights (on another machine, with other file times) has
the same identity, and any change to them, however small, gives another.

Hashing reads every byte once (about a second per few GB); the digest of each file is then kept
in the cache folder, keyed by the file's path, size, inode and modification time, so a later
start reads nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from cachedattention.model.embedded import BLOCKS_FILE, cache_home

log = logging.getLogger(__name__)

DIGESTS_FILE = "weights-digests.json"
_KEPT = 256  # digests remembered (the most recent)
_CHUNK = 8 << 20


def weights_id(path: Path) -> str:
    """Names, sizes and content hashes of the weight files of a folder (or of one file)."""
    # the blocks file is left out: it holds the same values (decoding from it is bit-identical)
    weights = sorted(f for f in path.glob("*.safetensors") if f.name != BLOCKS_FILE) if path.is_dir() else []
    files = [path] if path.is_file() else weights + sorted(path.glob("*.gguf"))
    known = _load(cache_home() / DIGESTS_FILE)
    h = hashlib.sha256()
    changed = False
    for f in files:
        st = os.stat(f)
        key = f"{os.path.realpath(f)}:{st.st_size}:{st.st_ino}:{st.st_mtime_ns}"
        digest = known.pop(key, None)
        if digest is None:
            digest, changed = _hash_file(f), True
        known[key] = digest  # (re)inserted last: the most recently used are kept
        h.update(f"{f.name}:{st.st_size}:{digest}".encode())
    if changed:
        _save(cache_home() / DIGESTS_FILE, known)
    return h.hexdigest()[:16]


def _hash_file(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load(file: Path) -> dict[str, str]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: the digests are computed again
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}


def _save(file: Path, known: dict[str, str]) -> None:
    kept = dict(list(known.items())[-_KEPT:])
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(kept))
        os.replace(tmp, file)  # concurrent starts: the last one's list stands, every digest in it right
    except OSError as e:  # a read-only or full cache folder: hash again next time
        log.debug("weights digests not kept (%s)", e)
        tmp.unlink(missing_ok=True)
