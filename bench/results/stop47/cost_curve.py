"""Cost curve for issue 12's batch ceiling: 8 sequences, each a block of r rows, one batched
forward (the pack target), and the pack draft's 8x1 step; interleaved, best of rounds."""
import json, time, sys, torch
from tandem.deploy.models import ModelSpec, build_runner
torch.set_num_threads(2)
T = build_runner(ModelSpec(ref="qwen2.5-coder-1.5b-instruct", dtype="bfloat16", device="cpu", quantize="pack"))
D = build_runner(ModelSpec(ref="qwen2.5-coder-0.5b-instruct", dtype="bfloat16", device="cpu", quantize="pack"))
print("kernels", T.kernel, T.quant_max_rows, D.kernel, D.quant_max_rows, flush=True)
ctx = [(11 + 7 * i) % 5000 + 100 for i in range(80)]
def seqs(r, n=8):
    out = []
    for i in range(n):
        s = r.new_sequence(200); r.prefill(s, ctx[i:i + 64]); out.append(s)
    return out
ts, ds = seqs(T), seqs(D)
res = {}
def timed(r, ss, rows):
    blocks = [ctx[:rows]] * len(ss)
    t0 = time.perf_counter(); r.extend_batch(ss, blocks); dt = time.perf_counter() - t0
    for s in ss: r.rollback(s, 64)
    return dt * 1000
cases = [("target", T, ts, r) for r in (1, 2, 3, 4, 5, 7)] + [("target1", T, ts[:1], r) for r in (1, 5)] + [("draft", D, ds, 1), ("draft1", D, ds[:1], 1)]
for rnd in range(4):
    for name, r, ss, rows in cases:
        k = f"{name} 8x{rows}" if len(ss) > 1 else f"{name} 1x{rows}"
        res.setdefault(k, []).append(timed(r, ss, rows))
for k, v in res.items(): print(k, "best ms", round(min(v), 1), [round(x, 1) for x in v])
json.dump({k: min(v) for k, v in res.items()}, open(sys.argv[1], "w"), indent=1)
