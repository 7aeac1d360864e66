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
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loaded first: the kernel's libgomp.so.1 then resolves to torch's own)

from cachedattention.model.embedded import cache_home

log = logging.getLogger(__name__)

COMPILE_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c11", "-fPIC")
# linked without -ffast-math: that would add crtfastmath.o, whose constructor switches the loading
# thread to flush denormals to zero, changing every later torch op's numerics in that thread
LINK_FLAGS = ("-shared", "-fopenmp")


def load_kernel(name: str) -> ctypes.CDLL | None:
    """The compiled `kernels/<name>.c`, or None (with a warning) when it cannot be built here."""
    source = Path(__file__).with_name(f"{name}.c")
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    compiler = shlex.split(found) if found else None  # CC may hold a wrapper: "ccache gcc"
    if not compiler:
        log.warning("no C compiler found: the %s kernel is off, attention uses torch", name)
        return None
    try:
        target = _build(source, compiler)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not build the %s kernel (%s): attention uses torch", name, exc)
        return None


def _build(source: Path, compiler: list[str]) -> Path:
    code = _source_with_includes(source)
    flags = " ".join(COMPILE_FLAGS + LINK_FLAGS).encode()
    key = hashlib.sha256(code + flags + _compiler_id(compiler) + _cpu_id(compiler)).hexdigest()[:16]
    folder = cache_home() / "kernels"
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=folder)
    os.close(fd)
    obj = tmp[: -len(".so")] + ".o"
    try:
        _run([*compiler, *COMPILE_FLAGS, "-c", str(source), "-o", obj])
        _run([*compiler, *LINK_FLAGS, obj, "-o", tmp, "-lm"])
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, obj):
            if os.path.exists(leftover):
                os.unlink(leftover)
    _remove_older_builds(target)
    return target


def _source_with_includes(source: Path, seen: set[Path] | None = None) -> bytes:
    """The source and the local files it includes (`#include "x.c"`, and what those include), each
    once, for the build's key."""
    seen = set() if seen is None else seen
    seen.add(source)
    code = source.read_bytes()
    included = [source.parent / name.decode() for name in re.findall(rb'^\s*#\s*include\s*"([^"]+)"', code, flags=re.MULTILINE)]
    return code + b"".join(_source_with_includes(path, seen) for path in included if path not in seen)


def _remove_older_builds(current: Path) -> None:
    """Builds of earlier sources or flags are never loaded again (a process that has one mapped
    keeps it: unlinking does not unmap); one that asks for it again rebuilds it."""
    stem = current.name.rsplit("-", 1)[0]
    for old in current.parent.glob(f"{stem}-*.so"):
        if old != current:
            old.unlink(missing_ok=True)


def _run(command: list[str]) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as exc:
        raise subprocess.SubprocessError(exc.stderr.decode(errors="replace").strip()[-500:]) from exc


def _compiler_id(compiler: list[str]) -> bytes:
    return subprocess.run([*compiler, "--version"], capture_output=True, timeout=30).stdout


def _cpu_id(compiler: list[str]) -> bytes:
    """What -march=native means here: the compiler's resolved target options (GCC), else the CPU's
    identity and features from /proc/cpuinfo (x86 and ARM name them differently)."""
    native = subprocess.run([*compiler, "-march=native", "-Q", "--help=target"], capture_output=True, timeout=30)
    if native.returncode == 0 and native.stdout:
        return native.stdout
    try:
        with open("/proc/cpuinfo", "rb") as f:
            keys = (b"model name", b"flags", b"Features", b"CPU implementer", b"CPU part")
            lines = [ln for ln in f.read().splitlines() if ln.startswith(keys)]
        return b"\n".join(sorted(set(lines))) or platform.processor().encode()
    except OSError:
        return platform.processor().encode()
