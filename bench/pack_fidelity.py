"""How close a pack served at 4 bits (quantize "pack") is to the same pack de-quantized to
bf16, and what each costs per step.

Fidelity: for each prompt, the bf16 model's greedy continuation (N tokens) is fed to both
models, one token at a time (as `ar` decodes); at every continuation position we compare the
next-token distributions: top-1 agreement, and KL(p_bf16 || p_pack) in nats, averaged over positions
(both in float32 from each model's logits). Step cost: median forward time for a block of
k rows after the prompt, k = 1, 2, 4, 8 (the verification cost curve speculation pays).

    python -m tandem.bench.pack_fidelity --prompts bench/eval/code_dev.jsonl --limit 8 \
        --output bench/results/pack_fidelity.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def say(msg: str) -> None:
    print(f"[pack-fidelity] {msg}", file=sys.stderr, flush=True)


def load_prompts(paths: list[str], limit: int) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        rows = [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()][:limit]
        out += [(Path(p).stem, r["turns"][0]) for r in rows]
    return out


def step_ms(runner, prompt: list[int], rows: int, reps: int = 5) -> float:
    seq = runner.new_sequence(len(prompt) + 16)
    runner.prefill(seq, prompt)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        runner.extend(seq, list(range(100, 100 + rows)))
        times.append(time.perf_counter() - t0)
        runner.rollback(seq, len(prompt))
    return 1000 * statistics.median(times[1:])


def main(argv=None) -> int:
    from tandem.actors.runner import ModelRunner
    from tandem.deploy.models import encode_prompt, tokenizer_for
    from tandem.deploy.pack_grid import pack_grid_file
    from tandem.deploy.packs import DEFAULT_TARGET, resolve_model_path
    from tandem.deploy.paths import EVAL_DIR

    ap = argparse.ArgumentParser(prog="pack-fidelity", description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=DEFAULT_TARGET, help="a model pack")
    ap.add_argument("--prompts", default=f"{EVAL_DIR / 'code_dev.jsonl'},{EVAL_DIR / 'spec_bench_dev.jsonl'}")
    ap.add_argument("--limit", type=int, default=8, help="prompts per file")
    ap.add_argument("--tokens", type=int, default=64, help="continuation positions per prompt")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pack_grid_file(args.target)
    path = resolve_model_path(args.target)
    say(f"loading {args.target}: bf16 dense and pack")
    dense = ModelRunner(path, dtype="bfloat16", device="cpu")
    pack = ModelRunner(path, dtype="bfloat16", device="cpu", quantize="pack")
    tok = tokenizer_for(args.target)
    per_file: dict[str, dict[str, list[float]]] = {}
    for i, (name, text) in enumerate(load_prompts(args.prompts.split(","), args.limit)):
        ids = encode_prompt(tok, prompt=text)
        # p: the bf16 model's next-token distributions along its own greedy continuation;
        # q: the pack's along the same tokens, fed one at a time as its `ar` is served (a
        # block of more than QuantLinear.QUANT_MAX_ROWS rows - the prompt - runs the dense
        # weight in both, so only decode positions tell the kernels apart)
        seq = dense.new_sequence(len(ids) + args.tokens + 1)
        step = [dense.prefill(seq, ids)]
        cont = []
        for _ in range(args.tokens):
            cont.append(int(step[-1].argmax()))
            step.append(dense.extend(seq, cont[-1:], all_logits=False)[-1])
        pseq = pack.new_sequence(len(ids) + args.tokens + 1)
        qstep = [pack.prefill(pseq, ids)] + [pack.extend(pseq, [t], all_logits=False)[-1] for t in cont[:-1]]
        p = torch.log_softmax(torch.stack(step[: args.tokens]).float(), -1)
        q = torch.log_softmax(torch.stack(qstep).float(), -1)
        agree = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
        kl = (p.exp() * (p - q)).sum(-1).mean().item()
        stats = per_file.setdefault(name, {"top1": [], "kl": []})
        stats["top1"].append(agree)
        stats["kl"].append(kl)
        say(f"{i + 1}: {name} top-1 agreement {agree:.3f}, KL {kl:.4f}")
    ids = encode_prompt(tok, prompt=load_prompts(args.prompts.split(",")[:1], 1)[0][1])
    cost = {k: {"dense_ms": round(step_ms(dense, ids, k), 1), "pack_ms": round(step_ms(pack, ids, k), 1)} for k in (1, 2, 4, 8)}
    result = {
        "target": args.target,
        "threads": torch.get_num_threads(),
        "tokens_per_prompt": args.tokens,
        "fidelity": {
            n: {"prompts": len(s["top1"]), "top1_agreement": round(statistics.mean(s["top1"]), 4), "mean_kl": round(statistics.mean(s["kl"]), 5)}
            for n, s in per_file.items()
        },
        "step_cost_ms": cost,
        "kernels": {"dense": dense.kernel, "pack": pack.kernel},
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
