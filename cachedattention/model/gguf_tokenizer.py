"""A GGUF file's tokenizer, converted by transformers once and then read from the cache folder.

transformers builds a GGUF file's tokenizer by reading the whole file's metadata with gguf's reader
and converting its vocabulary: seconds for a 50,000-token vocabulary, far more for a 150,000-token
one, at every start. The converted tokenizer is saved (as the embedded model's is) under a key of
everything the conversion reads: the architecture and the model's name (which pick the converter and
the tokenizer class), every `tokenizer.*` metadata value as the file's bytes hold it, and
transformers' version.
A file with the same vocabulary and template (another quantization of the same model) shares it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from cachedattention.model.embedded import cache_home
from cachedattention.model.gguf_reader import FastGGUFReader
from cachedattention.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_FOLDER = "gguf-tokenizers"
FORMAT = b"cachedattention gguf tokenizer v1"
STALE_SAVE_S = 3600.0  # a temporary save folder this old was left by a killed process
# besides the tokenizer's own values: the architecture picks the converter and the tokenizer class,
# and transformers reads a llama file named "mistral" as a Mistral model (another tokenizer class there)
KEYED_GENERAL = ("general.architecture", "general.name")
DONE = "converted"  # written last: a folder without it is an interrupted save


def tokenizer_key(reader: FastGGUFReader) -> str:
    """A digest of what transformers' conversion reads from the file."""
    import transformers

    digest = hashlib.sha256(FORMAT + b"\0" + transformers.__version__.encode())
    raw = memoryview(reader.data)
    for key, field in reader.fields.items():  # (the file's order)
        if key in KEYED_GENERAL or key.startswith("tokenizer."):
            digest.update(raw[field.start : field.end])
    return digest.hexdigest()[:32]


def gguf_tokenizer(path: Path, reader=None) -> Tokenizer:
    """The file's tokenizer: from the cache folder when it was converted before, else converted by
    transformers and saved there (a cache that cannot be written is only logged). `reader`: the
    file's, already open (gguf's own reader, taken for a big-endian file, is not this one's)."""
    try:
        reader = reader if isinstance(reader, FastGGUFReader) else FastGGUFReader(path)
        folder = cache_home() / CACHE_FOLDER / tokenizer_key(reader)
    except ValueError:  # (a big-endian file, or a damaged one: transformers says what it makes of it)
        return _converted(path)
    if _done(folder):
        try:
            return Tokenizer.from_pretrained(str(folder))
        except Exception as e:  # a damaged cache entry: converted again, and replaced
            log.warning("the cached tokenizer in %s cannot be read (%s: %s); converting the file's again",
                        folder, type(e).__name__, e)  # fmt: skip
    tok = _converted(path)
    _save(tok, folder)
    return tok


def _done(folder: Path) -> bool:
    """Whether the folder holds a whole saved tokenizer; False where it cannot be looked into (another
    user's entry in a shared cache home: is_file raises PermissionError there, it does not say False)."""
    try:
        return (folder / DONE).is_file()
    except OSError:
        return False


def _sweep_stale_saves(cache: Path) -> None:
    """Remove the temporary folders of saves killed midway (a save takes seconds: one an hour old is
    no other process's save in progress); each would otherwise stay, megabytes, for good."""
    now = time.time()
    for old in cache.glob(".save-*"):
        try:
            if now - old.stat().st_mtime > STALE_SAVE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread a moment)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022


def _converted(path: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _save(tok: Tokenizer, folder: Path) -> None:
    """Into a temporary folder beside it, renamed into place, so that no reader sees half of one."""
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _sweep_stale_saves(folder.parent)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".save-"))
        tok.hf.save_pretrained(str(tmp))
        (tmp / DONE).write_text("")
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would keep the entry from other users of the home
        shutil.rmtree(folder, ignore_errors=True)  # (a damaged one)
        os.replace(tmp, folder)
        tmp = None
    except OSError as e:  # a read-only or full cache folder: the next start converts again
        if _done(folder):
            return  # another process saved the same one meanwhile
        log.warning("the converted tokenizer cannot be kept in %s (%s); the next start converts it again",
                    folder, e)  # fmt: skip
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
