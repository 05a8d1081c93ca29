#!/usr/bin/env bash
# Re-runs every benchmark whose tables the README and docs show, one after the other (each
# needs the whole machine). Results land in bench/results/; `python -m tandem.bench.scripts.tables`
# renders them. About 90 minutes on 2 cores, half of it exit training.
#
#   STEPS="train report local pack actors grpc batch pools" bench/scripts/run_all.sh   # the default: all
#   STEPS="grpc" bench/scripts/run_all.sh                                   # one step
#
# train:  `tandem train-exits` on the 0.5B draft (exits 8,12,16; $TRAIN_MINUTES of training)
#         into its default folder, which every later step then picks up (exit_adapters: auto)
# report: `tandem exit-report` (per exit and target, before and after training; PNG plot)
# pack:   the 4-bit pack target against llama.cpp on the same GGUF (`make peer` builds it first)
set -euo pipefail
cd "$(dirname "$0")/../.."
T=.venv/bin/tandem
EVAL=${EVAL:-bench/eval}
STEPS=${STEPS:-train report local pack actors grpc batch pools}
TRAIN_MINUTES=${TRAIN_MINUTES:-28}
DRAFT=qwen2.5-coder-0.5b-instruct
mkdir -p bench/results
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
has() { [[ " $STEPS " == *" $1 "* ]]; }
EXITS_DIR=$(.venv/bin/python -c "from tandem.deploy.exits import default_exits_dir; print(default_exits_dir('$DRAFT'))")

if has train; then
  echo "== train: exits 8,12,16 of $DRAFT, $TRAIN_MINUTES minutes -> $EXITS_DIR"
  $T train-exits --draft $DRAFT --exits 8,12,16 --output "$EXITS_DIR" --minutes "$TRAIN_MINUTES" \
    | tee bench/results/train_exits.json
  cp "$EXITS_DIR/exit_adapters.json" bench/results/exit_adapters.json
fi

if has report; then
  echo "== report: acceptance and draft cost per exit and target, before and after training"
  $T exit-report --draft $DRAFT --output bench/results/exit_report > /dev/null
fi

if has local; then
  echo "== local: in-process, code_dev"
  $T bench --prompts $EVAL/code_dev.jsonl --limit 5 --max-new-tokens 96 \
    --methods hf-ar,hf-assisted,ar,sd,sorted,pearl,spectr --output bench/results/code_dev_local.json
fi

if has pack; then
  echo "== pack: the 4-bit pack target against llama.cpp (llamacpp-ar, llamacpp-spec) on the same GGUF"
  make peer > /dev/null
  $T bench --prompts $EVAL/code_dev.jsonl --limit 5 --max-new-tokens 96 \
    --methods llamacpp-ar,ar,sd,pearl,llamacpp-spec --output bench/results/code_dev_pack.json
fi

if has actors; then
  echo "== actors: through Ray actors (1 + 1 threads), with 4 requests in flight"
  $T bench --via actors --prompts $EVAL/code_dev.jsonl --limit 5 --max-new-tokens 96 \
    --methods hf-ar,hf-assisted,sd,pearl --concurrency 4 --output bench/results/code_dev_actors.json
fi

if has grpc; then
  echo "== grpc: through the gRPC server on its defaults (both targets)"
  PORT=${PORT:-50061}
  $T serve --port $PORT > bench/results/serve.log 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 300); do
    .venv/bin/python -c "
from tandem.services.client import TandemClient
import sys
try:
    sys.exit(0 if TandemClient('127.0.0.1:$PORT').health(timeout=2) == 'SERVING' else 1)
except Exception:
    sys.exit(1)" && break
    kill -0 $SERVER 2>/dev/null || { echo "tandem serve exited; see bench/results/serve.log"; exit 1; }
    sleep 2
  done
  $T bench --via grpc --server 127.0.0.1:$PORT --prompts $EVAL/code_dev.jsonl --limit 5 --max-new-tokens 96 \
    --warmup 10 --output bench/results/code_dev_grpc.json
  kill $SERVER; wait $SERVER || true
  trap - EXIT
fi

if has batch; then
  echo "== batch: spec_bench_dev, speculation on vs off"
  for m in off auto; do
    rm -f bench/results/batch_$m.jsonl
    $T batch --input $EVAL/spec_bench_dev.jsonl --output bench/results/batch_$m.jsonl --limit 12 \
      --max-new-tokens 64 --method $m --min-actors 1 --max-actors 1 | tail -1 > bench/results/batch_$m.summary.json
  done
fi
if has pools; then
  # chat: 12 Spec-Bench records (2 turns each); code: the 20 code_dev records; fresh pools per run
  echo "== pools: chat and code records through the server's pools and router (--engine pools), off/auto/auto/off"
  for set in chat:spec_bench_dev:12 code:code_dev:20; do
    IFS=: read -r name file n <<< "$set"
    i=0
    for m in off auto auto off; do
      i=$((i + 1))
      out=bench/results/batch_pools_${name}_${m}_$i
      rm -f $out.jsonl
      $T batch --input $EVAL/$file.jsonl --output $out.jsonl --limit $n \
        --max-new-tokens 64 --method $m --engine pools | tail -1 > $out.summary.json
    done
  done
fi
echo "done"
