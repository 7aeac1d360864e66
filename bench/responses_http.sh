#!/usr/bin/env bash
# The Responses API over HTTP on the embedded model: one seeded ShareGPT-like workload replayed by
# `bench --mode workload --url` against three fresh `cachedattention serve` processes in turn:
# CachedAttention through /v1/responses (each turn sends its new message and previous_response_id),
# CachedAttention through /v1/chat/completions (the whole conversation, session_id), and a server
# that recomputes every turn (--no-store --no-enable-prefix-caching) through /v1/responses.
# Usage: bash bench/responses_http.sh OUTPUT_DIR [SESSIONS]
set -euo pipefail
out=${1:?usage: bench/responses_http.sh OUTPUT_DIR [SESSIONS]}
sessions=${2:-12}
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
mkdir -p "$out"
workload=(--sessions "$sessions" --max-answer-tokens 32 --session-rate 0.5 --think-time 2 --seed 0)

run() {  # NAME PORT API SERVE_FLAGS...
  local name=$1 port=$2 api=$3
  shift 3
  local store
  store=$(mktemp -d)
  "$py" -m cachedattention.cli serve --port "$port" --store-dir "$store" "$@" >"$out/$name.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do
    grep -q "Uvicorn running" "$out/$name.server.log" 2>/dev/null && break
    sleep 1
  done
  "$py" -m cachedattention.cli bench --mode workload "${workload[@]}" --url "http://127.0.0.1:$port" --api "$api" \
    --json "$out/$name.json" --out "$out/$name" | tee "$out/$name.md"
  kill "$pid"
  wait "$pid" || true
  rm -rf "$store"
}

run responses 8101 responses
run chat 8102 chat
run recompute-responses 8103 responses --no-store --no-enable-prefix-caching
