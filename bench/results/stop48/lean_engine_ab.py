"""Stop 48: `ar` and `sd` in-process (LocalEngine) with the lean forward on both runners against
the general one, interleaved per prompt; checks the outputs are the same either way."""
import json, time, statistics, torch
from tandem.deploy.models import ModelSpec, build_runner, tokenizer_for
from tandem.actors.local import LocalEngine
torch.set_num_threads(2)
T = build_runner(ModelSpec(ref="qwen2.5-coder-1.5b-instruct", dtype="bfloat16", device="cpu", quantize="pack"))
D = build_runner(ModelSpec(ref="qwen2.5-coder-0.5b-instruct", dtype="bfloat16", device="cpu", quantize="pack", exits=(8, 12, 16), exit_adapters="auto"))
print("lean", T._lean is not None, D._lean is not None, "qmax", T.quant_max_rows, D.quant_max_rows, flush=True)
keep = {id(T): T._lean, id(D): D._lean}
def lean(on):
    for r in (T, D): r._lean = keep[id(r)] if on else None
tok = tokenizer_for("qwen2.5-coder-1.5b-instruct")
rows = [json.loads(l) for l in open("bench/eval/code_dev.jsonl")][:6]
prompts = []
for row in rows:
    text = row.get("prompt") or (row.get("turns") or [""])[0]
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
eng = LocalEngine(T, D, threads=2, prefix_cache_bytes=0)
outs = {}
def run(method, on, p):
    lean(on)
    t = time.perf_counter(); res = eng.generate(p, method=method, max_new_tokens=64, draft_len=3 if method == "sd" else None)
    dt = time.perf_counter() - t
    outs.setdefault((method, tuple(p)), set()).add(tuple(res.tokens))
    return (dt - res.prefill_s) / max(len(res.tokens) - 1, 1) * 1000
res = {}
for rep in range(3):
    for p in prompts:
        for method in ("ar", "sd"):
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                res.setdefault((method, on), []).append(run(method, on, p))
    print({f"{m} lean={o}": round(statistics.median(v), 2) for (m, o), v in sorted(res.items())}, flush=True)
for m in ("ar", "sd"):
    a, b = res[(m, True)], res[(m, False)]
    print(m, "ms/token lean", round(statistics.median(a), 2), "general", round(statistics.median(b), 2), "paired ratio general/lean median", round(statistics.median([y / x for x, y in zip(a, b)]), 3))
print("outputs equal lean vs general:", all(len(v) == 1 for v in outs.values()), "ar == sd:", all(outs[("ar", tuple(p))] == outs[("sd", tuple(p))] for p in prompts))
