"""Chunked prefill on one target worker: how long a long prompt stalls the requests already
decoding on it, whole against in chunks (issue 12).

An in-process TargetWorker (the class the target actors wrap) serves `--decoders` requests,
each stepping autoregressively (an empty block per verify) on its own thread, as under load.
Then a `--prompt-tokens` prompt opens on the same worker. Per prefill chunk size (the whole
prompt in one chunk is the old behaviour), interleaved over `--rounds`:
- stall: the decoders' longest and median step that overlapped the prefill (a whole-prompt
  prefill holds every decoder for its full forward),
- decoded: tokens the decoders produced while the prompt prefilled,
- prefill_s: the prompt's own time to its first token (chunks cost it some).
Writes JSON; prints one line per measurement and a summary against the whole-prompt chunk."""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

TARGET = "qwen2.5-coder-1.5b-instruct"


def _load(target: str, quantize: str):
    from tandem.actors.workers import ModelLoad
    from tandem.deploy.pack_grid import target_quantize, with_pack_grid
    from tandem.deploy.packs import resolve_model_path

    q = target_quantize(target, quantize)
    return ModelLoad(path=target, dtype="bfloat16", device="cpu", quantize=q,
                     resolve=with_pack_grid(resolve_model_path) if q == "pack" else resolve_model_path)


def measure(worker, prompt: list[int], *, decoders: int, key: str) -> dict:
    """One prefill of `prompt` while `decoders` requests step; the decoders open fresh each
    time (short prompts) so every measurement sees the same context lengths."""
    from tandem.speculation.sampling import SamplingParams

    greedy = SamplingParams()
    ids = [f"{key}-d{i}" for i in range(decoders)]
    for i, rid in enumerate(ids):
        worker.open(rid, prompt[i : i + 16], sampling=greedy)
    stop = threading.Event()
    steps: list[list[tuple[float, float]]] = [[] for _ in ids]

    def decode(i: int) -> None:
        for _ in range(512):  # bounded, whatever happens to the prefill
            if stop.is_set():
                return
            t0 = time.perf_counter()
            worker.verify(ids[i], None)
            steps[i].append((t0, time.perf_counter()))

    threads = [threading.Thread(target=decode, args=(i,), daemon=True) for i in range(decoders)]
    for t in threads:
        t.start()
    while min(len(s) for s in steps) < 3:  # all decoding before the prompt arrives
        time.sleep(0.005)
    mixed0 = worker.mixed_steps
    t0 = time.perf_counter()
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
        "mixed_steps": worker.mixed_steps - mixed0,
    }


def main(argv=None) -> None:
    from tandem.actors.workers import TargetWorker
    from tandem.bench.bench import machine_info

    ap = argparse.ArgumentParser(prog="chunked-prefill", description=__doc__.splitlines()[0])
    ap.add_argument("--target", default=TARGET)
    ap.add_argument("--quantize", default="auto", help="as tandem serve's targets: auto = the pack's 4-bit grid")
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
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    worker = TargetWorker(_load(args.target, args.quantize), threads=args.threads)
    print(f"loaded {args.target} ({worker.runner.kernel}) in {time.perf_counter() - t0:.0f}s", flush=True)
    vocab = worker.runner.vocab_size
    prompt = [(101 + 37 * i) % min(vocab, 150000) for i in range(args.prompt_tokens)]
    measure(worker, prompt[:32], decoders=1, key="warm")  # warm-up
    runs: dict[int, list[dict]] = {c: [] for c in sizes}
    for r in range(args.rounds):
        for c in sizes:
            worker.verifier.prefill_chunk = c
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
    res = {"target": args.target, "kernel": worker.runner.kernel, "threads": args.threads, "decoders": args.decoders,
           "prompt_tokens": args.prompt_tokens, "machine": machine_info(args.threads), "runs": runs,
           "summary": summary, "note": "best of rounds; stall and prefill: min, decoded: max"}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
