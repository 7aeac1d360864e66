"""How long a GGUF model takes to load: reading the file's metadata (`open_gguf`), its tokenizer
(`load_tokenizer`) and the whole `LLM(model=FILE)`, for a tiny Qwen3 file with the embedded model's
50,000-token vocabulary (written once into FOLDER with the tests' GGUF writer). With
`--fresh-tokenizer`, the converted tokenizers kept in the cache folder are removed first (a first
start). A diagnostic: to compare two versions of the code, alternate runs with PYTHONPATH pointing
at each checkout (run from this repository's root):

    CACHEDATTENTION_HOME=/tmp/cahome PYTHONPATH=/path/to/checkout .venv/bin/python bench/gguf_load_timing.py FOLDER [--fresh-tokenizer]
"""

import shutil
import sys
import time
from pathlib import Path


def main(folder: Path, fresh_tokenizer: bool) -> None:
    path = folder / "model.gguf"
    if not path.exists():
        sys.path.append(str(Path(__file__).resolve().parents[1]))  # (after PYTHONPATH: the code compared)
        from tests.gguf_files import write_tiny_gguf

        folder.mkdir(parents=True, exist_ok=True)
        write_tiny_gguf("qwen3", folder, {"attn_q": "Q8_0"})
    from cachedattention import LLM
    from cachedattention.model.embedded import cache_home
    from cachedattention.model.gguf_loader import open_gguf
    from cachedattention.model.loader import load_tokenizer

    if fresh_tokenizer:
        shutil.rmtree(cache_home() / "gguf-tokenizers", ignore_errors=True)
    times = {}
    t = time.perf_counter()
    open_gguf(path)
    times["open_gguf"] = time.perf_counter() - t
    t = time.perf_counter()
    load_tokenizer(str(path), 1 << 20)
    times["load_tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    LLM(model=str(path))
    times["LLM()"] = time.perf_counter() - t
    print(" ".join(f"{k} {v:.2f} s" for k, v in times.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--fresh-tokenizer" in sys.argv[2:])
