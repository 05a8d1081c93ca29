"""Forwards of a pack target with its attention in C++ against torch's, on this machine.

On ggml's bf16 CPU runners, decode and verification blocks attend in one C++ call
(actors/layer_ops.py FusedLayerOps.attend); before, torch's scaled_dot_product_attention ran
per layer with the cache writes, stacks and reshapes around it. This loads the target once and
times the same forwards both ways on the same runner (its ops' attend_max_rows set to 0 gives
torch's path), interleaved round by round (median of `reps` a round, best round): one request
of 1 row and of 5, and 8 requests of 1 and of 5 rows each, every sequence holding `context`
tokens. Writes JSON; prints one line per case. Where the runner has no C++ attention (not on
ggml's kernels, not bf16, the extension not built) both ways are torch's and it says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tandem.bench.kernel_tiles import common_args, cpu_model, interleaved

CASES = {"1x1": [1], "1x5": [5], "8x1": [1] * 8, "8x5": [5] * 8}
WAYS = ("cpp", "torch")


class Sequences:
    """`count` sequences holding the same `context` tokens (one prefill, then forks); each
    forward rolls them back to it."""

    def __init__(self, runner, count: int, context: int, longest: int):
        self.runner, self.context = runner, context
        self.ids = [(7 + 13 * i) % runner.vocab_size for i in range(context + longest)]
        first = runner.new_sequence(context + longest + 1)
        runner.prefill(first, self.ids[:context])
        self.seqs = [first] + [runner.fork(first) for _ in range(count - 1)]

    def forward_s(self, rows: list[int], reps: int) -> float:
        """Median over `reps` of one forward of len(rows) sequences, rows[i] new tokens each."""
        seqs, c = self.seqs[: len(rows)], self.context
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            self.runner.extend_batch(seqs, [self.ids[c : c + n] for n in rows])
            times.append(time.perf_counter() - t0)
            for s in seqs:
                self.runner.rollback(s, c)
        return statistics.median(times)


def main(argv=None) -> None:
    from tandem.actors.runner import ModelRunner
    from tandem.deploy.packs import resolve_model_path

    ap = argparse.ArgumentParser(prog="attend-rows", description=__doc__.splitlines()[0])
    common_args(ap)
    ap.add_argument("--context", type=int, default=300, help="tokens each sequence holds before the forward")
    args = ap.parse_args(argv)
    if args.context < 1:
        raise SystemExit("--context must be at least 1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runner = ModelRunner(resolve_model_path(args.target), dtype="bfloat16", device="cpu", quantize="pack")
    cpp_rows = runner.ops.attend_max_rows
    print(f"loaded {args.target} (kernel {runner.kernel}, ops {runner.ops.name}) in {time.perf_counter() - t0:.0f}s: "
          f"C++ attention for blocks of up to {cpp_rows} rows", flush=True)
    if not cpp_rows:
        print("this runner has no C++ attention (not on ggml's bf16 kernels, or the extension not built): both ways are torch's")
    longest = max(max(r) for r in CASES.values())
    batch = Sequences(runner, max(len(r) for r in CASES.values()), args.context, longest)
    batch.forward_s([1, 1], reps=1)  # warm-up
    out = {}
    try:
        for name, rows in CASES.items():
            def time_way(way: str, rows=rows) -> float:
                runner.ops.attend_max_rows = cpp_rows if way == "cpp" else 0
                return batch.forward_s(rows, args.reps)

            c = out[name] = interleaved(rows, WAYS, args.rounds, time_way)
            c["torch_over_cpp"] = c.pop("ratio")
            print(f"{name:4s} ({sum(rows)} rows): C++ {c['cpp_s'] * 1000:6.1f} ms  torch {c['torch_s'] * 1000:6.1f} ms  "
                  f"x{c['torch_over_cpp']:.2f}", flush=True)
    finally:
        runner.ops.attend_max_rows = cpp_rows
    res = {"target": args.target, "threads": args.threads, "cpu": cpu_model(), "context": args.context, "reps": args.reps,
           "rounds": args.rounds, "attend_max_rows": cpp_rows, "row_bound": runner.quant_max_rows, "cases": out}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
