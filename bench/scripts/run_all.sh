#!/usr/bin/env bash
# Re-runs every benchmark whose tables the README and docs show, one after the other (each
# needs the whole machine). Results land in bench/results/. Takes about two hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
T=.venv/bin/tandem
EVAL=${EVAL:-../shared/eval}
mkdir -p bench/results
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ -z "${SKIP_LOCAL:-}" ]; then
echo "== 1. in-process, code_dev"
$T bench --prompts $EVAL/code_dev.jsonl --limit 10 --max-new-tokens 96 \
  --methods hf-ar,hf-assisted,ar,sd,sorted,pearl,spectr --json bench/results/code_dev_local.json
fi

echo "== 2. through Ray actors (1 + 1 threads), with 4 requests in flight"
$T bench --via actors --prompts $EVAL/code_dev.jsonl --limit 6 --max-new-tokens 96 \
  --methods hf-ar,hf-assisted,sd,pearl --concurrency 4 --json bench/results/code_dev_actors.json

echo "== 3. through the gRPC server on its defaults (both targets)"
PORT=${PORT:-50061}
$T serve --port $PORT > bench/results/serve.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  .venv/bin/python -c "
from services.client import TandemClient
import sys
try:
    sys.exit(0 if TandemClient('127.0.0.1:$PORT').health(timeout=2) == 'SERVING' else 1)
except Exception:
    sys.exit(1)" && break
  sleep 2
done
$T bench --via grpc --server 127.0.0.1:$PORT --prompts $EVAL/code_dev.jsonl --limit 6 --max-new-tokens 96 \
  --warmup 10 --json bench/results/code_dev_grpc.json
kill $SERVER; wait $SERVER || true
trap - EXIT

echo "== 4. batch, spec_bench_dev, speculation on vs off"
for m in off auto; do
  rm -f bench/results/batch_$m.jsonl
  $T batch --input $EVAL/spec_bench_dev.jsonl --output bench/results/batch_$m.jsonl --limit 12 \
    --max-new-tokens 64 --method $m --min-actors 1 --max-actors 1 | tail -1 > bench/results/batch_$m.summary.json
done
echo "done"
