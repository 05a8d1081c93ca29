import json, sys, torch
from tandem.deploy.pack_grid import resolver_for
from tandem.deploy.packs import resolve_model_path
from tandem.deploy.models import trained_exits_for, tokenizer_for
from tandem.actors.exit_adapters import load_exit_adapters
from tandem.actors.runner import ModelRunner
torch.set_num_threads(2)
ref = "qwen2.5-coder-0.5b-instruct"
path = resolver_for(resolve_model_path, "pack")(ref)
ad, trained, head = load_exit_adapters(trained_exits_for(ref, "auto"), dtype="bfloat16")
r = ModelRunner(path, dtype="bfloat16", quantize="pack", exits=tuple(sorted(set(trained) | {24})), head_ids=tuple(head.tolist()), restricted_head="early", exit_adapters=ad)
S = torch.zeros(151936, dtype=torch.bool); S[head] = True
tok = tokenizer_for("qwen2.5-coder-1.5b-instruct")
for f in sys.argv[1:]:
    rows = [json.loads(l) for l in open(f)][:8]
    miss = tot = 0
    for row in rows:
        text = row.get("prompt") or (row.get("turns") or [""])[0] if not row.get("messages") else row["messages"][-1]["content"]
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        if hasattr(ids, "input_ids"): ids = ids["input_ids"]
        s = r.new_sequence(len(ids) + 100)
        lg = r.prefill(s, ids)
        t = int(lg[-1].argmax()) if lg.dim() > 1 else int(lg.argmax())
        for _ in range(64):
            miss += int(not S[t]); tot += 1
            lg = r.extend_batch([s], [[t]])[0]
            t = int(lg[-1].argmax())
        r.release(s)
    print(f, "draft greedy tokens outside the head:", miss, "/", tot, f"{miss/tot:.3%}", flush=True)
