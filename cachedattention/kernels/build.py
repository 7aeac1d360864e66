"""Builds a kernel's C source once per machine into the cache folder and loads it with ctypes.

The shared object is keyed by a hash of the source, the flags, the compiler and the CPU's
features (it is built with -march=native), and written under a temporary name then renamed,
so concurrent processes never load a half-written file. Without a working C compiler the
caller gets None and keeps the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernel's libgomp.so.1 then resolves to torch's own)

from cachedattention.model.embedded import cache_home

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c11", "-shared", "-fPIC")


def load_kernel(name: str) -> ctypes.CDLL | None:
    """The compiled `kernels/<name>.c`, or None (with a warning) when it cannot be built here."""
    source = Path(__file__).with_name(f"{name}.c")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the %s kernel is off, attention uses torch", name)
        return None
    try:
        target = _build(source, compiler)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not build the %s kernel (%s): attention uses torch", name, exc)
        return None


def _build(source: Path, compiler: str) -> Path:
    code = source.read_bytes()
    key = hashlib.sha256(code + " ".join(FLAGS).encode() + _compiler_id(compiler) + _cpu_id()).hexdigest()[:16]
    folder = cache_home() / "kernels"
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(source), "-o", tmp, "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as exc:
        raise subprocess.SubprocessError(exc.stderr.decode(errors="replace").strip()[-500:]) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _compiler_id(compiler: str) -> bytes:
    done = subprocess.run([compiler, "--version"], capture_output=True, timeout=30)
    return done.stdout


def _cpu_id() -> bytes:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith((b"model name", b"flags"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode()
