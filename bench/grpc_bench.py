"""`tandem bench --via grpc`: through a running server, per target: tokens/s, time to first
token and time per output token (p50/p95) with speculation on (the router's `auto`) against
the same server with speculation off, measured in the same run.

The router learns per target which exit and draft length pay off; `--warmup` requests per
target let it settle before anything is measured, and the exits it used are reported.

`--concurrency C` (C > 1): each series runs one request at a time and then C in flight on the
same server, and the C rows get their aggregate tokens/s and p50 time per output token over
their own one-at-a-time row's ("x one at a time", "TPOT x one"): issue 12's check (aggregate
>= 3x, TPOT <= 2.5x at 8 in flight) read from one run.

`--llamacpp`: llama.cpp's `llama-server` (bench/llama_peer.py) runs too, in the same run, on
each target's model pack GGUF, with the same prompts (the same chat template and token ids as
the server's), the same threads, as many requests in flight as `--concurrency` (its own
continuous batching, `-np` slots), streamed and timed like the server's requests; every row
then gets its ratio to it ("x llamacpp-ar"). The tandem server stays up, idle, meanwhile, and
on a host with few cores its idle processes (each actor's Ray main thread, the raylet, the
object store, Ray's agents: ~1,000 wake-ups a second in all, ~8% of a core) slow llama.cpp: on this project's 2-core host it ran 12.88 tok/s
one at a time beside an idle `make serve` against 14.29 alone (0.90x; at 8 in flight 26.6-27.3
beside it, 28.2-29.3 alone). So there the ratios favour tandem by up to ~10%; measure the peer
alone with the server stopped (`tandem bench --methods llamacpp-ar [--concurrency C]`) for
figures to quote.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tandem.bench.bench import eprint, load_prompts, write_json


@dataclass
class RequestTiming:
    tokens: int
    seconds: float
    ttft: float
    tpot: float | None
    stats: dict | None


@dataclass
class Series:
    target: str
    method: str
    wall_s: float = 0.0
    timings: list[RequestTiming] = field(default_factory=list)

    def summary(self) -> dict:
        tokens = sum(t.tokens for t in self.timings)
        ttft = [t.ttft for t in self.timings]
        tpot = [t.tpot for t in self.timings if t.tpot is not None]
        exits: dict[str, int] = {}
        # mean accepted length over the series: tokens committed / rounds, summed over its
        # requests (rounds-weighted, as SpecStats.merge and the server's counters
        # tandem_spec_decode_num_emitted_tokens_total / num_drafts_total give it), not a mean
        # of per-request ratios. A request's committed tokens are an integer sent as the
        # float32 ratio mean_accepted_len * rounds, so rounding recovers it exactly.
        rounds = emitted = 0
        for t in self.timings:
            if t.stats:
                for k, v in (t.stats.get("exits_used") or {}).items():
                    exits[str(k)] = exits.get(str(k), 0) + int(v)
                if t.stats.get("rounds"):
                    rounds += int(t.stats["rounds"])
                    emitted += round(t.stats["mean_accepted_len"] * t.stats["rounds"])
        return {
            "target": self.target,
            "method": self.method,
            "requests": len(self.timings),
            "tokens": tokens,
            "tokens_per_s": round(tokens / self.wall_s, 3) if self.wall_s else 0.0,
            "ttft_p50_s": round(_pct(ttft, 50), 4),
            "ttft_p95_s": round(_pct(ttft, 95), 4),
            "tpot_p50_s": round(_pct(tpot, 50), 4) if tpot else None,
            "tpot_p95_s": round(_pct(tpot, 95), 4) if tpot else None,
            "mean_accepted_len": round(emitted / rounds, 3) if rounds else None,
            "exits_used": exits,
            # the exit that drafted most of this series' tokens: what the router settled on
            "settled_exit": int(max(exits, key=lambda k: exits[k])) if exits else None,
            "methods_used": sorted({t.stats.get("method") for t in self.timings if t.stats}),
        }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def timed_series(target: str, method: str, stream, items: list, *, concurrency: int) -> Series:
    """`stream(item)` for each item, `concurrency` at a time, each request timed (timed())."""
    series = Series(target=target, method=method)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        series.timings = list(pool.map(lambda item: timed(stream(item)), items))
    series.wall_s = time.perf_counter() - t0
    return series


def run_series(client, *, target: str, method: str, prompts: list, concurrency: int, max_new_tokens: int) -> Series:
    return timed_series(target, method, lambda p: client.generate_stream(target=target, messages=p["messages"],
                                                                          max_new_tokens=max_new_tokens, method=method),
                        prompts, concurrency=concurrency)


def timed(stream) -> RequestTiming:
    """Time one streamed request: `stream` yields chunks with `token_ids` (and `stats`, the
    server's, on its last) or plain lists of token ids (llama-server)."""
    t0 = time.perf_counter()
    first = None
    last = None
    tokens = 0
    for chunk in stream:
        ids = chunk if isinstance(chunk, list) else chunk.token_ids
        if ids and first is None:
            first = time.perf_counter() - t0
        tokens += len(ids)
        last = chunk
    total = time.perf_counter() - t0
    first = first if first is not None else total
    tpot = (total - first) / (tokens - 1) if tokens > 1 else None
    stats = getattr(last, "stats", None)
    return RequestTiming(tokens=tokens, seconds=total, ttft=first, tpot=tpot, stats=stats)


def llamacpp_series(target: str, model: str, *, prompts: list, concurrency: int, max_new_tokens: int, threads: int,
                    binary: str | None) -> Series:
    """llama-server on `model`'s pack GGUF with `concurrency` slots, the prompts sent
    `concurrency` at a time as the server's were: greedy, streamed."""
    from tandem.bench.llama_peer import LlamaServer
    from tandem.deploy.models import encode_prompt, tokenizer_for
    from tandem.deploy.packs import PACKS

    if model not in PACKS:
        raise ValueError(f"llamacpp: target {target!r} serves {model!r}, not a model pack; llama.cpp runs a pack's GGUF "
                         f"(packs: {', '.join(PACKS)})")
    tokenizer = tokenizer_for(model)
    ids = [encode_prompt(tokenizer, messages=p["messages"]) for p in prompts]
    with LlamaServer(binary, model, threads=threads, parallel=concurrency) as server:
        server.generate(ids[0][:1], max_new_tokens=8)  # warm-up, on no prompt's prefix
        return timed_series(target, "llamacpp-ar", lambda x: server.generate_stream(x, max_new_tokens=max_new_tokens), ids,
                            concurrency=concurrency)


def _over(a: float | None, b: float | None) -> float | None:
    """a / b to 3 places; None where either is missing (or b is 0)."""
    return round(a / b, 3) if a is not None and b else None


def against_one_at_a_time(rows: list[dict]) -> None:
    """Give each row run with several requests in flight its aggregate tokens/s and p50 time
    per output token over those of the row of the same target and method run one at a time."""
    alone = {(r["target"], r["method"]): r for r in rows if r.get("concurrency", 1) == 1}
    for r in rows:
        one = alone.get((r["target"], r["method"]))
        if r.get("concurrency", 1) > 1 and one is not None:
            r["gain_vs_one_at_a_time"] = _over(r["tokens_per_s"], one["tokens_per_s"])
            r["tpot_p50_vs_one_at_a_time"] = _over(r["tpot_p50_s"] or None, one["tpot_p50_s"])


def format_table(rows: list[dict]) -> str:
    peer = any(r.get("speedup_vs_llamacpp_ar") is not None for r in rows)  # the column only where llama.cpp ran
    many = any(r.get("concurrency", 1) > 1 for r in rows)  # the load columns only where some ran several in flight
    head = ["target", "speculation"] + (["in flight"] if many else []) + ["tok/s", "x off"] + (
        ["x llamacpp-ar"] if peer else []) + (["x one at a time", "TPOT x one"] if many else []) + [
        "TTFT p50/p95 s", "TPOT p50/p95 s", "mean acc. len", "exits used"]

    def ratio(v):
        return f"{v:.2f}" if v is not None else "-"
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        tp = f"{r['tpot_p50_s']}/{r['tpot_p95_s']}" if r["tpot_p50_s"] is not None else "-"
        x_peer = r.get("speedup_vs_llamacpp_ar")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["target"],
                    r["method"],
                    *([str(r.get("concurrency", 1))] if many else []),
                    f"{r['tokens_per_s']:.2f}",
                    f"{r.get('speedup_vs_off', 1.0):.2f}",
                    *([ratio(x_peer)] if peer else []),
                    *([ratio(r.get("gain_vs_one_at_a_time")), ratio(r.get("tpot_p50_vs_one_at_a_time"))] if many else []),
                    f"{r['ttft_p50_s']}/{r['ttft_p95_s']}",
                    tp,
                    str(r["mean_accepted_len"] or "-"),
                    ", ".join(f"{k}: {v}" for k, v in sorted(r["exits_used"].items(), key=lambda kv: int(kv[0]))) or "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(args) -> int:
    from tandem.services.client import TandemClient

    import os

    token = args.token or os.environ.get("TANDEM_AUTH_TOKEN")
    prompts = load_prompts(args.prompts, args.limit)
    binary = None
    if getattr(args, "llamacpp", False):
        from tandem.actors.devices import available_threads
        from tandem.bench.llama_peer import llamacpp_binary

        binary = llamacpp_binary(getattr(args, "llamacpp_bin", None))
        if binary is None:
            raise ValueError("llamacpp: no llama-server found (--llamacpp-bin, $TANDEM_LLAMACPP_BIN, PATH, or `make peer`)")
        threads = getattr(args, "threads", None) or available_threads()
    with TandemClient(args.server, token=token) as client:
        info = client.list_models()
        targets = [t.strip() for t in args.targets.split(",")] if args.targets else [t["name"] for t in info["targets"]]
        rows = []
        for target in targets:
            if args.warmup:
                eprint(f"[bench] {target}: {args.warmup} warm-up requests (the router settles its exit and draft length)")
                warm = (prompts * (args.warmup // len(prompts) + 1))[: args.warmup]
                run_series(client, target=target, method="auto", prompts=warm, concurrency=1, max_new_tokens=args.max_new_tokens)
            for c in sorted({1, args.concurrency}):  # the CLI refuses fewer than 1
                eprint(f"[bench] {target}: speculation off, {c} in flight")
                off = run_series(client, target=target, method="off", prompts=prompts, concurrency=c, max_new_tokens=args.max_new_tokens).summary()
                eprint(f"[bench] {target}: speculation on ({args.method}), {c} in flight")
                on = run_series(client, target=target, method=args.method, prompts=prompts, concurrency=c, max_new_tokens=args.max_new_tokens).summary()
                on["speedup_vs_off"] = _over(on["tokens_per_s"], off["tokens_per_s"])
                off["speedup_vs_off"] = 1.0
                level = [off, on]
                if binary is not None:
                    model = next((t["model"] for t in info["targets"] if t["name"] == target), target)
                    eprint(f"[bench] {target}: llama.cpp's llama-server on {model}'s GGUF, {c} in flight, {threads} threads "
                           "(beside the idle server: on few cores that slows it; see bench/grpc_bench.py)")
                    peer = llamacpp_series(target, model, prompts=prompts, concurrency=c,
                                           max_new_tokens=args.max_new_tokens, threads=threads, binary=binary).summary()
                    peer["speedup_vs_off"] = _over(peer["tokens_per_s"], off["tokens_per_s"])
                    for r in (off, on, peer):
                        r["speedup_vs_llamacpp_ar"] = _over(r["tokens_per_s"], peer["tokens_per_s"])
                    level.append(peer)
                for r in level:
                    r["concurrency"] = c
                rows += level
    against_one_at_a_time(rows)
    table = format_table(rows)
    print(table)
    if args.output:
        write_json(
            args.output,
            {
                "results": rows,
                "config": {
                    "server": args.server,
                    "prompts": str(args.prompts),
                    "limit": args.limit,
                    "max_new_tokens": args.max_new_tokens,
                    "concurrency": args.concurrency,
                    "warmup": args.warmup,
                    "method": args.method,
                    "llamacpp": binary is not None,  # then measured beside the idle server (see the module's docstring)
                },
                "server": info,
            },
        )
        eprint(f"[bench] wrote {args.output}")
    return 0

