#!/usr/bin/env bash
# Copy what bench/gpu.sh needs but a bare GPU machine lacks (the embedded model's tokenizer, for rendering
# chats in the workload benchmark) into .gpu-assets/ (git-ignored), to be carried along with the run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/.gpu-assets/tokenizer"
"${PYTHON:-$root/.venv/bin/python}" - "$root/.gpu-assets/tokenizer" <<'PY'
import sys
from cachedattention.model.embedded import embedded_model_dir
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(str(embedded_model_dir())).save_pretrained(sys.argv[1])
PY
du -sh "$root/.gpu-assets"
