#!/usr/bin/env bash
# One prepared run on a CUDA GPU: the tests marked `gpu`, then the turn, throughput and workload
# benchmarks on a Llama-3-8B-shaped random-weight model (bf16), and last (so it can never crowd out
# the others) the turn bench's queued cells: the device read buffer on and off. Installs nothing: it
# runs from source with the machine's own PyTorch (>= 2.11) and transformers (>= 5.17). Each stage has
# its own time limit, 575 s in all, so that the whole script fits one 600 s device command
# (tests/bench/test_gpu_script.py checks the sum); the first run on an H200 was cut in its workload
# part, which has been made smaller since; the whole script has not run on a GPU since.
# Usage: run bench/gpu-assets.sh here once, then there, with .gpu-assets carried:
#   bash bench/gpu.sh /tmp/gpu $OUT/gpu.tgz
# The results go to OUTPUT_DIR; ARCHIVE, if given, is rewritten after every stage with all of them
# (the device tool brings back a few files only, and a stage cut short still leaves the earlier ones).
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUTPUT_DIR [ARCHIVE]}
archive=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
pack() { [ -z "$archive" ] || tar -czf "$archive" --exclude=.home -C "$out" .; }
tok=${TOKENIZER_DIR:-$root/.gpu-assets/tokenizer}  # the embedded model's tokenizer (copied by bench/gpu-assets.sh)
if [ ! -f "$tok/tokenizer.json" ]; then
  echo "no tokenizer at $tok: run bench/gpu-assets.sh here and carry .gpu-assets (the workload stage needs it)" | tee "$out/setup.log"
  status_setup=1
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CACHEDATTENTION_HOME="$out/.home"
cd "$root"
py=${PYTHON:-python3}
status=${status_setup:-0}

$py - <<'PY' 2>&1 | tee "$out/env.log"
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
PY

echo "== tests marked gpu" | tee "$out/gpu-tests.log"
timeout 90 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee -a "$out/gpu-tests.log" || status=1
pack

echo "== turn benchmark" | tee "$out/turn.log"
timeout 150 $py -m cachedattention.cli bench --mode turn --random-shape llama3-8b --device cuda --dtype bfloat16 \
  --history 4096,16384,32768 --new-tokens 256 --repeats 3 \
  --cells device,host-sync,host-layerwise --json "$out/turn.json" 2>&1 | tee -a "$out/turn.log" || status=1
pack

echo "== throughput benchmark" | tee "$out/throughput.log"
timeout 80 $py -m cachedattention.cli bench --mode throughput --random-shape llama3-8b --device cuda --dtype bfloat16 \
  --repeats 3 --json "$out/throughput.json" 2>&1 | tee -a "$out/throughput.log" || status=1
pack

echo "== workload benchmark" | tee "$out/workload.log"
# the replay runs in real time: think times scaled to a tenth keep its 24-turn session inside the limit
timeout 180 $py -m cachedattention.cli bench --mode workload --random-shape llama3-8b --device cuda --dtype bfloat16 \
  --tokenizer "$tok" --sessions 10 --max-answer-tokens 48 --time-scale 0.1 --systems RE,CachedAttention \
  --json "$out/workload.json" --out "$out/workload" 2>&1 | tee -a "$out/workload.log" || status=1
pack

echo "== read buffer: a host hit queued behind a running job, with and without preload" | tee "$out/turn-queued.log"
timeout 75 $py -m cachedattention.cli bench --mode turn --random-shape llama3-8b --device cuda --dtype bfloat16 \
  --history 16384 --new-tokens 256 --repeats 3 --cells host-layerwise,host-queued,host-queued-no-preload \
  --json "$out/turn-queued.json" 2>&1 | tee -a "$out/turn-queued.log" || status=1
pack

exit $status
