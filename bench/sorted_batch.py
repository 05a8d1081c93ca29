"""Sorted (S2D) drafting for concurrent requests on one draft: batched in lockstep against
one call after another (what a draft actor did with sorted calls before, issue 12).

The 0.5B pack draft (on its own 4-bit grid) with the shipped exit adapters, as `tandem serve`'s draft pool,
and the thresholds every entry point uses (the adapters' calibration). `--requests` requests,
each on its own code prompt (bench/eval/code_dev.jsonl, chat template), draft `--draft-len`
tokens from that prompt; each measurement rolls their caches back to the prompt, so every
one drafts the same work. Per policy (sorted over the shipped exits, and the full depth
alone for reference), interleaved over `--rounds`, best of them:
- one_by_one_s: every request's draft call alone (Drafter.draft per request),
- batched_s: one Drafter.draft_batch over all of them,
- forwards: runner forwards per measurement for each (first exit plus continuations).
Writes JSON; prints one line per measurement and the summary."""

from __future__ import annotations

import argparse
import json
import time

import torch

DRAFT = "qwen2.5-coder-0.5b-instruct"
PROMPTS = "bench/eval/code_dev.jsonl"


def _drafter(model: str, quantize: str):
    from tandem.actors.drafter import Drafter
    from tandem.actors.workers import ModelLoad
    from tandem.deploy.exits import find_trained_exits
    from tandem.deploy.pack_grid import draft_quantize, resolver_for
    from tandem.deploy.packs import resolve_model_path

    adapters = find_trained_exits(model)
    if adapters is None:
        raise SystemExit(f"no exit adapters for {model} (shipped or trained): sorted drafting needs them")
    q = draft_quantize(model, quantize)
    load = ModelLoad(path=model, dtype="bfloat16", device="cpu", quantize=q,
                     exit_adapters=str(adapters), resolve=resolver_for(resolve_model_path, q))
    return Drafter(load.build()), str(adapters), load.local_path()


def _prompts(path: str, model_dir: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    with open(path) as f:
        for line in f:
            turn = json.loads(line)["turns"][0]
            text = tok.apply_chat_template([{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False)
            out.append(tok.encode(text, add_special_tokens=False))
            if len(out) == n:
                return out
    raise SystemExit(f"{path} has fewer than {n} prompts")


def _counted(runner) -> list[int]:
    count = [0]
    for name in ("forward_to_depth", "continue_batch"):
        inner = getattr(runner, name)

        def wrapped(*a, _inner=inner, **k):
            count[0] += 1
            return _inner(*a, **k)

        setattr(runner, name, wrapped)
    return count


def measure(drafter, calls: list[dict], count: list[int], *, batched: bool) -> tuple[float, int, list]:
    for c in calls:  # back to the prompt: every measurement drafts the same tokens
        req = drafter.requests[c["request_id"]]
        drafter.runner.rollback(req.seq, len(c["sequence"]) - 1)
    n0 = count[0]
    t0 = time.perf_counter()
    if batched:
        blocks = drafter.draft_batch(calls)
    else:
        blocks = [drafter.draft(c["request_id"], c["sequence"], draft_len=c["draft_len"], policy=c["policy"]) for c in calls]
    dt = time.perf_counter() - t0
    for b in blocks:
        if isinstance(b, BaseException):
            raise b
    return dt, count[0] - n0, blocks


def main(argv=None) -> None:
    from tandem.bench.bench import machine_info
    from tandem.deploy.models import default_thresholds
    from tandem.speculation.sampling import SamplingParams
    from tandem.speculation.sorted_policy import ExitPolicy

    ap = argparse.ArgumentParser(prog="sorted-batch", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DRAFT)
    ap.add_argument("--quantize", default="auto", help="as tandem serve's draft pool (auto: the pack's grid); none for bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--draft-len", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", default=PROMPTS)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    for name in ("threads", "requests", "draft_len", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    drafter, adapters, model_dir = _drafter(args.model, args.quantize)
    runner = drafter.runner
    exits = tuple(runner.exits)
    sorted_policy = ExitPolicy(exits=exits, thresholds=default_thresholds(adapters, exits))
    print(f"loaded {args.model} ({runner.kernel}, exits {list(exits)}, thresholds {list(sorted_policy.thresholds)}) "
          f"in {time.perf_counter() - t0:.0f}s", flush=True)
    prompts = _prompts(args.prompts, model_dir, args.requests)
    count = _counted(runner)
    policies = {"sorted": sorted_policy, "full_depth": ExitPolicy.single(runner.num_layers)}
    calls: dict[str, list[dict]] = {}
    for name, policy in policies.items():
        calls[name] = []
        for i, p in enumerate(prompts):
            rid = f"{name}-{i}"
            drafter.open(rid, sampling=SamplingParams())
            drafter.draft(rid, p, draft_len=1, policy=policy)  # the prompt fed once (not measured)
            calls[name].append({"request_id": rid, "sequence": p, "draft_len": args.draft_len, "policy": policy})
    runs: dict[str, dict[str, list]] = {name: {"one_by_one": [], "batched": []} for name in policies}
    exits_used: dict[str, dict[int, int]] = {}
    for r in range(args.rounds):
        for name in policies:
            for mode in ("one_by_one", "batched"):
                dt, forwards, blocks = measure(drafter, calls[name], count, batched=mode == "batched")
                runs[name][mode].append({"s": round(dt, 4), "forwards": forwards})
                used: dict[int, int] = {}
                for b in blocks:
                    for e in b.exits:
                        used[e] = used.get(e, 0) + 1
                exits_used[name] = used
                print(f"round {r} {name:10s} {mode:10s}: {dt:.3f}s  {forwards} forwards  exits {dict(sorted(used.items()))}", flush=True)
    summary = {}
    for name, modes in runs.items():
        one, bat = (min(x["s"] for x in modes[m]) for m in ("one_by_one", "batched"))
        summary[name] = {"one_by_one_s": one, "batched_s": bat, "one_by_one_over_batched": round(one / bat, 2),
                         "forwards_one_by_one": modes["one_by_one"][0]["forwards"], "forwards_batched": modes["batched"][0]["forwards"],
                         "exits_used": {str(k): v for k, v in sorted(exits_used[name].items())}}
        print(f"{name:10s}: one by one {one:.3f}s, batched {bat:.3f}s, x{one / bat:.2f}", flush=True)
    res = {"model": args.model, "kernel": runner.kernel, "exits": list(exits), "thresholds": list(sorted_policy.thresholds),
           "threads": args.threads, "requests": args.requests, "draft_len": args.draft_len,
           "prompt_tokens": [len(p) for p in prompts], "machine": machine_info(args.threads), "runs": runs,
           "summary": summary, "note": "best of rounds"}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
