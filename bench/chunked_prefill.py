"""Chunked prefill on one worker: how long a long prompt stalls the requests already decoding
on it, whole against in chunks (issue 12).

--role target: an in-process TargetWorker (the class the target actors wrap) serves
`--decoders` requests, each stepping autoregressively (an empty block per verify) on its own
thread, as under load; then a `--prompt-tokens` prompt opens on the same worker.
--role draft: a DraftWorker (the 0.5B draft, int4, as tandem serve's draft pool) serves
`--decoders` requests drafting 4 tokens per call; then a request's first draft call catches
up on a `--prompt-tokens` prompt.
Per chunk size (the whole prompt in one chunk is the old behaviour), interleaved over
`--rounds`:
- stall: the decoders' longest and median call that overlapped the prefill (a whole-prompt
  prefill holds every decoder for its full forward),
- decoded: calls the decoders finished while the prompt prefilled,
- prefill_s: the prompt's own time (its open, or its first draft call).
Writes JSON; prints one line per measurement and a summary against the whole-prompt chunk."""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

MODELS = {"target": "qwen2.5-coder-1.5b-instruct", "draft": "qwen2.5-coder-0.5b-instruct"}
DRAFT_LEN = 4  # the decoders' draft calls (--role draft)


def _worker(role: str, model: str, quantize: str, threads: int):
    from tandem.actors.workers import DraftWorker, ModelLoad, TargetWorker
    from tandem.deploy.pack_grid import draft_quantize, resolver_for, target_quantize
    from tandem.deploy.packs import resolve_model_path

    if role == "draft":  # as tandem serve's draft pool
        q = draft_quantize(model, quantize)
        return DraftWorker(ModelLoad(path=model, dtype="bfloat16", device="cpu", quantize=q,
                                     resolve=resolver_for(resolve_model_path, q)), threads=threads)
    q = target_quantize(model, quantize)
    load = ModelLoad(path=model, dtype="bfloat16", device="cpu", quantize=q, resolve=resolver_for(resolve_model_path, q))
    return TargetWorker(load, threads=threads)


def _set_chunk(worker, chunk: int) -> None:
    (worker.drafter if hasattr(worker, "drafter") else worker.verifier).prefill_chunk = chunk


def _runner(worker):
    return worker.drafter.runner if hasattr(worker, "drafter") else worker.runner


def measure(worker, prompt: list[int], *, decoders: int, key: str) -> dict:
    """One prefill of `prompt` while `decoders` requests step; the decoders open fresh each
    time (short prompts) so every measurement sees the same context lengths."""
    from tandem.speculation.sampling import SamplingParams

    greedy = SamplingParams()
    drafting = hasattr(worker, "drafter")
    ids = [f"{key}-d{i}" for i in range(decoders)]
    for i, rid in enumerate(ids):
        if drafting:
            worker.open(rid, sampling=greedy)
        else:
            worker.open(rid, prompt[i : i + 16], sampling=greedy)
    stop = threading.Event()
    steps: list[list[tuple[float, float]]] = [[] for _ in ids]

    def decode(i: int) -> None:
        for _ in range(512):  # bounded, whatever happens to the prefill
            if stop.is_set():
                return
            t0 = time.perf_counter()
            if drafting:
                worker.draft(ids[i], prompt[i : i + 16], draft_len=DRAFT_LEN)
            else:
                worker.verify(ids[i], None)
            steps[i].append((t0, time.perf_counter()))

    threads = [threading.Thread(target=decode, args=(i,), daemon=True) for i in range(decoders)]
    for t in threads:
        t.start()
    while min(len(s) for s in steps) < 3:  # all decoding before the prompt arrives
        time.sleep(0.005)
    mixed0 = getattr(worker, "mixed_steps", 0)
    t0 = time.perf_counter()
    if drafting:
        worker.open(f"{key}-p", sampling=greedy)
        t0 = time.perf_counter()
        worker.draft(f"{key}-p", prompt, draft_len=DRAFT_LEN)
    else:
        worker.open(f"{key}-p", prompt, sampling=greedy)
    t1 = time.perf_counter()
    stop.set()
    for t in threads:
        t.join(120)
    for rid in ids + [f"{key}-p"]:
        worker.close(rid)
    overlapping = [b - a for s in steps for a, b in s if b > t0 and a < t1]
    decoded = sum(t0 <= b <= t1 for s in steps for _, b in s)
    return {
        "prefill_s": round(t1 - t0, 4),
        "longest_step_s": round(max(overlapping), 4) if overlapping else None,
        "median_step_s": round(statistics.median(overlapping), 4) if overlapping else None,
        "decoded": decoded,
        "mixed_steps": getattr(worker, "mixed_steps", 0) - mixed0,
    }


def main(argv=None) -> None:
    from tandem.bench.bench import machine_info

    ap = argparse.ArgumentParser(prog="chunked-prefill", description=__doc__.splitlines()[0])
    ap.add_argument("--role", choices=sorted(MODELS), default="target")
    ap.add_argument("--model", default=None, help="default: the role's pack (" + ", ".join(f"{k}: {v}" for k, v in MODELS.items()) + ")")
    ap.add_argument("--quantize", default="auto", help="as tandem serve: auto = the pack's 4-bit grid (target and draft)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decoders", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--chunks", default="32,64,128", help="chunk sizes besides the whole prompt")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every chunk size")
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    if args.decoders < 1 or args.prompt_tokens < 2:
        ap.error("--decoders must be >= 1 and --prompt-tokens >= 2")
    chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
    if any(c < 1 for c in chunks):
        ap.error("--chunks: sizes must be >= 1")
    sizes = [args.prompt_tokens] + [c for c in chunks if c < args.prompt_tokens]
    model = args.model or MODELS[args.role]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    worker = _worker(args.role, model, args.quantize, args.threads)
    runner = _runner(worker)
    print(f"loaded {model} as a {args.role} ({runner.kernel}) in {time.perf_counter() - t0:.0f}s", flush=True)
    vocab = runner.vocab_size
    prompt = [(101 + 37 * i) % min(vocab, 150000) for i in range(args.prompt_tokens)]
    measure(worker, prompt[:32], decoders=1, key="warm")  # warm-up
    runs: dict[int, list[dict]] = {c: [] for c in sizes}
    for r in range(args.rounds):
        for c in sizes:
            _set_chunk(worker, c)
            m = measure(worker, prompt, decoders=args.decoders, key=f"r{r}c{c}")
            runs[c].append(m)
            print(f"round {r} chunk {c:4d}: prefill {m['prefill_s']:.2f}s  decoders' longest step {m['longest_step_s']}s "
                  f"median {m['median_step_s']}s  decoded {m['decoded']}  mixed steps {m['mixed_steps']}", flush=True)
    summary = {}
    whole = args.prompt_tokens
    best = {c: {k: min(m[k] for m in ms) for k in ("prefill_s", "longest_step_s", "median_step_s")} |
               {"decoded": max(m["decoded"] for m in ms)} for c, ms in runs.items()}
    for c in sizes:
        b, w = best[c], best[whole]
        summary[c] = {**b, "stall_ratio_vs_whole": round(b["longest_step_s"] / w["longest_step_s"], 2),
                      "prefill_cost_vs_whole": round(b["prefill_s"] / w["prefill_s"], 2)}
        print(f"chunk {c:4d}: longest decoder step x{summary[c]['stall_ratio_vs_whole']} of whole-prompt, "
              f"prefill x{summary[c]['prefill_cost_vs_whole']}, decoded {b['decoded']} during it", flush=True)
    res = {"role": args.role, "model": model, "kernel": runner.kernel, "threads": args.threads, "decoders": args.decoders,
           "prompt_tokens": args.prompt_tokens, "machine": machine_info(args.threads), "runs": runs,
           "summary": summary, "note": "best of rounds; stall and prefill: min, decoded: max"}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
