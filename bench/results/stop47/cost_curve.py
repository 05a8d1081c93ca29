"""Cost curve behind issue 12's batch ceiling (stop 47): one batched forward of 8 sequences
with a block of r rows each on the 1.5B pack target, one at a time for reference, and the
0.5B pack draft's one-row step for 8 and for 1; interleaved over 4 rounds, best of them.
Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/results/stop47/cost_curve.py OUT.json"""

import json
import sys
import time

import torch

from tandem.deploy.models import ModelSpec, build_runner

PROMPT = 64  # cached tokens per sequence before each timed block
ROUNDS = 4


def sequences(runner, ids, n):
    out = []
    for i in range(n):
        s = runner.new_sequence(200)
        runner.prefill(s, ids[i:i + PROMPT])
        out.append(s)
    return out


def timed_ms(runner, seqs, ids, rows):
    t0 = time.perf_counter()
    runner.extend_batch(seqs, [ids[:rows]] * len(seqs))
    dt = time.perf_counter() - t0
    for s in seqs:
        runner.rollback(s, PROMPT)
    return dt * 1000


def main(out_path):
    torch.set_num_threads(2)
    target = build_runner(ModelSpec(ref="qwen2.5-coder-1.5b-instruct", dtype="bfloat16", device="cpu", quantize="pack"))
    draft = build_runner(ModelSpec(ref="qwen2.5-coder-0.5b-instruct", dtype="bfloat16", device="cpu", quantize="pack"))
    print("kernels", target.kernel, target.quant_max_rows, draft.kernel, draft.quant_max_rows, flush=True)
    ids = [(11 + 7 * i) % 5000 + 100 for i in range(80)]
    ts, ds = sequences(target, ids, 8), sequences(draft, ids, 8)
    cases = [("target", target, ts, r) for r in (1, 2, 3, 4, 5, 7)]
    cases += [("target1", target, ts[:1], r) for r in (1, 5)]
    cases += [("draft", draft, ds, 1), ("draft1", draft, ds[:1], 1)]
    res = {}
    for _ in range(ROUNDS):
        for name, runner, seqs, rows in cases:
            res.setdefault(f"{name} {len(seqs)}x{rows}", []).append(timed_ms(runner, seqs, ids, rows))
    for k, v in res.items():
        print(k, "best ms", round(min(v), 1), [round(x, 1) for x in v])
    with open(out_path, "w") as f:
        json.dump({k: min(v) for k, v in res.items()}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
