"""Forwards of a pack target on tandem's own tiles (VNNI or AVX2) against ggml's own layouts, on this machine.

Off AMX on AVX-512 VNNI or AVX2, a pack's Q8_0 and Q4_K linears run on tandem's tiles
(actors/csrc/vnni_tiles.h); TANDEM_GGML_TILES=ggml keeps them in ggml's layouts. This loads the
target twice in one process, once each way, and times the same forwards on both, interleaved
round by round (median of `reps` a round, best round): one request of 1 row (a decoding step)
and of 5 (a verification block), and 4 and 8 requests of one row each (a step under load).
Writes JSON; prints one line per case. Where the tiles take nothing (an AMX host, a CPU without
AVX-512 VNNI nor AVX2, ggml not built) both runners are the same and it says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from tandem.bench.packed_rows import CONTEXT, Batch

CASES = {"1x1": [1], "1x5": [5], "4x1": [1] * 4, "8x1": [1] * 8}
WAYS = ("tiles", "ggml")  # TANDEM_GGML_TILES=own, =ggml


def forward_s(batch: Batch, rows: list[int], reps: int) -> float:
    """Median over `reps` of one forward of len(rows) sequences, rows[i] new tokens each."""
    runner, ids = batch.runner, batch.ids
    seqs = batch.seqs[: len(rows)]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.extend_batch(seqs, [ids[CONTEXT : CONTEXT + n] for n in rows])
        times.append(time.perf_counter() - t0)
        for s in seqs:
            runner.rollback(s, CONTEXT)
    return statistics.median(times)


def layouts(runner) -> dict[str, int]:
    """How many of the runner's quantized linears sit in each ggml layout."""
    counts: dict[str, int] = {}
    for lin in runner._quant_linears():
        ggml = getattr(lin, "ggml", None)
        if ggml is not None:
            counts[ggml.layout] = counts.get(ggml.layout, 0) + 1
    return counts


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def common_args(ap: argparse.ArgumentParser) -> None:
    """The arguments every two-ways forward bench here takes."""
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="forwards a round (their median counts)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both ways")
    ap.add_argument("--output", default=None)


def interleaved(rows: list[int], ways: tuple[str, str], rounds: int, time_way) -> dict:
    """One case: time_way(way) for each way in turn, `rounds` times over; its record, with each
    way's best round ("<way>_s") and the second way's best over the first's ("ratio")."""
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            times[way].append(time_way(way))
    best = {way: min(t) for way, t in times.items()}
    return {"sequences": len(rows), "rows": sum(rows), **{f"{way}_s": round(best[way], 4) for way in ways},
            "rounds_s": {way: [round(t, 4) for t in times[way]] for way in ways},
            "ratio": round(best[ways[1]] / best[ways[0]], 2)}


def main(argv=None) -> None:
    from tandem.actors import ggml_kernel
    from tandem.actors.runner import ModelRunner
    from tandem.deploy.packs import resolve_model_path

    ap = argparse.ArgumentParser(prog="kernel-tiles", description=__doc__.splitlines()[0])
    common_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runners, batches, found = {}, {}, {}
    before = os.environ.get(ggml_kernel.TILES_SWITCH)
    try:
        for way in WAYS:
            os.environ[ggml_kernel.TILES_SWITCH] = "own" if way == "tiles" else "ggml"
            t0 = time.perf_counter()
            runners[way] = ModelRunner(resolve_model_path(args.target), dtype="bfloat16", device="cpu", quantize="pack")
            found[way] = layouts(runners[way])
            print(f"loaded {args.target} ({way}, kernel {runners[way].kernel}) in {time.perf_counter() - t0:.0f}s: "
                  f"linears {found[way]}, row bound {runners[way].quant_max_rows}", flush=True)
    finally:
        if before is None:
            os.environ.pop(ggml_kernel.TILES_SWITCH, None)
        else:
            os.environ[ggml_kernel.TILES_SWITCH] = before
    if not {"VNNI", "AVX2"} & set(found["tiles"]):
        print("tandem's tiles take no linear here (AMX host, neither AVX-512 VNNI nor AVX2, or ggml not built): both ways are ggml's")
    longest = max(max(r) for r in CASES.values())
    for way in WAYS:
        batches[way] = Batch(runners[way], max(len(r) for r in CASES.values()), longest)
        forward_s(batches[way], [1, 1], reps=1)  # warm-up
    out = {}
    for name, rows in CASES.items():
        c = out[name] = interleaved(rows, WAYS, args.rounds, lambda way: forward_s(batches[way], rows, args.reps))
        c["ggml_over_tiles"] = c.pop("ratio")
        print(f"{name:4s} ({sum(rows)} rows): tiles {c['tiles_s'] * 1000:6.1f} ms  ggml's layouts {c['ggml_s'] * 1000:6.1f} ms  "
              f"x{c['ggml_over_tiles']:.2f}", flush=True)
    one = {way: out["1x1"][f"{way}_s"] for way in WAYS}
    for name in CASES:
        out[name]["one_row_steps"] = {way: round(out[name][f"{way}_s"] / one[way], 2) for way in WAYS}
    res = {"target": args.target, "threads": args.threads, "cpu": cpu_model(), "context": CONTEXT, "reps": args.reps,
           "rounds": args.rounds, "linears": found, "row_bound": {w: runners[w].quant_max_rows for w in WAYS}, "cases": out}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
