"""A Hugging Face model id (`ORG/NAME`) read from the local Hugging Face cache, as vLLM serves one
with HF_HUB_OFFLINE=1: nothing is downloaded here, so an id names a snapshot already on disk."""

from __future__ import annotations

import os
import re
from pathlib import Path

# the hub's own rule for a repository id (huggingface_hub's validate_repo_id): NAME or ORG/NAME
_REPO_ID = re.compile(r"(?:[\w][\w.-]*/)?[\w][\w.-]*")
# a snapshot folder of the cache: .../models--ORG--NAME/snapshots/COMMIT
_SNAPSHOT = re.compile(r"models--([^/]+)/snapshots/[^/]+$")


def hub_cache_dir() -> Path:
    """The folder the hub keeps its models in, read from the environment at each call (as
    huggingface_hub reads it at import): HF_HUB_CACHE, HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # (its older name, still read by huggingface_hub)
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def expanded(source: str, what: str = "model") -> Path:
    """`source` as a path, ~ and ~user expanded; a ValueError for a ~user that is no user."""
    try:
        return Path(source).expanduser()
    except RuntimeError:  # (pathlib's "Could not determine home directory")
        raise ValueError(f"{what} path {source!r}: its ~ names no user of this machine") from None


def _exists(path: Path) -> bool:
    """Whether `path` exists; a name the system refuses (too long, ...) names nothing that does."""
    try:
        return path.exists()
    except OSError:
        return False


def looks_like_model_id(source: str) -> bool:
    """Whether `source` could name a model on the hub (a path that does not exist may still)."""
    return (len(source) <= 96 and bool(_REPO_ID.fullmatch(source)) and "--" not in source and ".." not in source
            and not source.endswith((".git", ".", "-")))  # fmt: skip


def local_model_path(source: str, what: str = "model", revision: str | None = None,
                     cache_dir: str | None = None) -> str:  # fmt: skip
    """`source` itself where it is a path that exists (a path wins over an id), else the snapshot
    of the model id `source` at `revision` (a branch, tag or commit; default main) in the local
    Hugging Face cache (`cache_dir`, else hub_cache_dir()). A ValueError says how to get one
    that is not there; a source that is neither a path nor an id is left to the loader to refuse."""
    if _exists(expanded(source, what)) or not looks_like_model_id(source):
        if revision is not None:
            raise ValueError(f"a revision ({revision!r}) picks a version of a Hugging Face model id, but {what} "
                             f"{source!r} is a path, not a model id: give the id, or no revision")  # fmt: skip
        return source
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    snapshot = _cached_snapshot(source, revision, cache)
    if snapshot is None:
        at = f" at revision {revision!r}" if revision is not None else ""
        fetch = source + (f" --revision {revision}" if revision is not None else "")
        raise ValueError(
            f"{what} {source!r} does not exist: no such path, and the model id is not in the local Hugging Face "
            f"cache{at} ({cache}). Nothing is downloaded here: get it with `hf download {fetch}` (or "
            f"`huggingface-cli download {fetch}`) where the hub can be reached, into this cache (HF_HUB_CACHE or "
            "HF_HOME), then give the id again, or the folder")
    return snapshot


def existing_local_path(source: str, what: str = "model", revision: str | None = None,
                        cache_dir: str | None = None) -> Path:  # fmt: skip
    """`source` as local_model_path finds it, as a path that exists; a ValueError says what to give."""
    path = expanded(local_model_path(source, what, revision, cache_dir), what)
    if not _exists(path):
        wanted = "a Hugging Face folder or a .gguf file" if what == "model" else "a folder with a tokenizer, or a .gguf file"
        raise ValueError(f"{what} path {source!r} does not exist (give {wanted})")
    return path


def _cached_snapshot(model_id: str, revision: str | None, cache: Path) -> str | None:
    """The snapshot folder of `model_id` at `revision` in the cache `cache`, or None: the commit a
    branch or tag names in refs/, or the commit itself, as huggingface_hub looks it up offline."""
    revision = revision or "main"
    if ".." in Path(revision).parts or Path(revision).is_absolute():
        return None  # (a revision is a name in the cache, never a way out of it)
    repo = cache / ("models--" + model_id.replace("/", "--"))
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return str(snapshot) if commit and snapshot.is_dir() else None


def model_id_of_snapshot(path: Path) -> str | None:
    """`ORG/NAME` for a snapshot folder of the hub cache (its name is a commit's hash), else None."""
    match = _SNAPSHOT.search(path.expanduser().absolute().as_posix())
    return None if match is None else match.group(1).replace("--", "/")  # (an id holds no "--")
