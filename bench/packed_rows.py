"""Batched forwards on one runner, two choices measured on this machine:
1. packed against padded rows: the forward time of mixes of sequences with different row
   counts (what a target step sees under load: target-only steps of 1 row beside PEARL blocks
   of draft_len + 1 rows, or a prefill chunk), both layouts, interleaved, best of `reps`;
2. the quantized kernels' row bound: a block of n rows with the bound the runner measured at
   load (runner.quant_max_rows) against the fixed 8 it replaced (above 8 rows: the dense
   weight), interleaved, best of `reps`.
Writes JSON; prints one line per case."""

from __future__ import annotations

import argparse
import json
import time

import torch

MIXES = {
    "8x1": [1] * 8,
    "1x9+7x1": [9] + [1] * 7,
    "4x9+4x1": [9] * 4 + [1] * 4,
    "8x9": [9] * 8,
    "32+3x1": [32] + [1] * 3,
    "2x5": [5, 5],
}
CONTEXT = 64
BLOCKS = (9, 16, 48)  # a PEARL block of 8 drafts + 1, a short and a typical code prompt


def set_bound(runner, rows: int) -> None:
    for lin in runner._quant_linears():
        lin.max_rows = rows


class Batch:
    """Sequences holding the same CONTEXT tokens (one prefill, then forks), reused by every
    measurement of a mix; each measurement rolls them back to CONTEXT."""

    def __init__(self, runner, count: int, longest: int):
        self.runner = runner
        self.ids = [(7 + 13 * i) % runner.vocab_size for i in range(CONTEXT + longest)]
        first = runner.new_sequence(CONTEXT + longest + 1)
        runner.prefill(first, self.ids[:CONTEXT])
        self.seqs = [first] + [runner.fork(first) for _ in range(count - 1)]

    def close(self) -> None:
        for s in self.seqs:
            self.runner.release(s)


def measure(batch: Batch, rows: list[int], *, packed: bool, reps: int) -> float:
    runner, ids = batch.runner, batch.ids
    runner.packed = packed
    seqs = batch.seqs[: len(rows)]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.extend_batch(seqs, [ids[CONTEXT : CONTEXT + n] for n in rows])
        best = min(best, time.perf_counter() - t0)
        for s in seqs:
            runner.rollback(s, CONTEXT)
    return best


def main(argv=None) -> None:
    from tandem.actors.runner import ModelRunner
    from tandem.deploy.packs import resolve_model_path

    ap = argparse.ArgumentParser(prog="packed-rows", description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--quantize", default="pack")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both layouts")
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runner = ModelRunner(resolve_model_path(args.target), dtype="bfloat16", device="cpu", quantize=args.quantize)
    print(f"loaded {args.target} ({args.quantize}) in {time.perf_counter() - t0:.0f}s; quantized kernels up to "
          f"{runner.quant_max_rows} rows", flush=True)
    batch = Batch(runner, max(len(r) for r in MIXES.values()), max(max(r) for r in MIXES.values()) + max(BLOCKS))
    measure(batch, [1, 1], packed=True, reps=1)  # warm-up
    out = {}
    for name, rows in MIXES.items():
        times = {"padded": [], "packed": []}
        for _ in range(args.rounds):
            for layout in ("padded", "packed"):
                times[layout].append(measure(batch, rows, packed=layout == "packed", reps=args.reps))
        pad, pk = min(times["padded"]), min(times["packed"])
        out[name] = {"rows": sum(rows), "padded_rows": len(rows) * max(rows), "padded_s": round(pad, 4),
                     "packed_s": round(pk, 4), "padded_over_packed": round(pad / pk, 2)}
        print(f"{name:10s} rows {sum(rows):3d} (padded {len(rows) * max(rows):3d}): padded {pad * 1000:7.1f} ms  "
              f"packed {pk * 1000:7.1f} ms  x{pad / pk:.2f}", flush=True)
    bound = {}
    measured = runner.quant_max_rows
    for n in BLOCKS:
        times = {"fixed_8": [], "measured": []}
        for _ in range(args.rounds):
            for name, rows in (("fixed_8", 8), ("measured", measured)):
                set_bound(runner, rows)
                times[name].append(measure(batch, [n], packed=True, reps=args.reps))
        f8, ms = min(times["fixed_8"]), min(times["measured"])
        bound[n] = {"fixed_8_s": round(f8, 4), "measured_s": round(ms, 4), "fixed_over_measured": round(f8 / ms, 2)}
        print(f"block {n:3d} rows: bound 8 {f8 * 1000:7.1f} ms  bound {measured} {ms * 1000:7.1f} ms  x{f8 / ms:.2f}", flush=True)
    set_bound(runner, measured)
    res = {"target": args.target, "quantize": args.quantize, "threads": args.threads, "context": CONTEXT, "mixes": out,
           "quant_max_rows": measured, "blocks": bound}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
