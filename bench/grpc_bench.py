"""`tandem bench --via grpc`: through a running server, per target: tokens/s, time to first
token and time per output token (p50/p95) with speculation on (the router's `auto`) against
the same server with speculation off, measured in the same run.

The router learns per target which exit and draft length pay off; `--warmup` requests per
target let it settle before anything is measured, and the exits it used are reported.
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


def one_request(client, *, target: str, messages: list, method: str, max_new_tokens: int) -> RequestTiming:
    t0 = time.perf_counter()
    first = None
    last = None
    tokens = 0
    for chunk in client.generate_stream(target=target, messages=messages, max_new_tokens=max_new_tokens, method=method):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - t0
        tokens += len(chunk.token_ids)
        last = chunk
    total = time.perf_counter() - t0
    first = first if first is not None else total
    tpot = (total - first) / (tokens - 1) if tokens > 1 else None
    return RequestTiming(tokens=tokens, seconds=total, ttft=first, tpot=tpot, stats=last.stats if last else None)


def run_series(client, *, target: str, method: str, prompts: list, concurrency: int, max_new_tokens: int) -> Series:
    series = Series(target=target, method=method)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futs = [
            pool.submit(one_request, client, target=target, messages=p["messages"], method=method, max_new_tokens=max_new_tokens)
            for p in prompts
        ]
        for f in futs:
            series.timings.append(f.result())
    series.wall_s = time.perf_counter() - t0
    return series


def format_table(rows: list[dict]) -> str:
    head = ["target", "speculation", "tok/s", "x off", "TTFT p50/p95 s", "TPOT p50/p95 s", "mean acc. len", "exits used"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        tp = f"{r['tpot_p50_s']}/{r['tpot_p95_s']}" if r["tpot_p50_s"] is not None else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["target"],
                    r["method"],
                    f"{r['tokens_per_s']:.2f}",
                    f"{r.get('speedup_vs_off', 1.0):.2f}",
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
    with TandemClient(args.server, token=token) as client:
        info = client.list_models()
        targets = [t.strip() for t in args.targets.split(",")] if args.targets else [t["name"] for t in info["targets"]]
        rows = []
        for target in targets:
            if args.warmup:
                eprint(f"[bench] {target}: {args.warmup} warm-up requests (the router settles its exit and draft length)")
                warm = (prompts * (args.warmup // len(prompts) + 1))[: args.warmup]
                run_series(client, target=target, method="auto", prompts=warm, concurrency=1, max_new_tokens=args.max_new_tokens)
            eprint(f"[bench] {target}: speculation off")
            off = run_series(client, target=target, method="off", prompts=prompts, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens).summary()
            eprint(f"[bench] {target}: speculation on ({args.method})")
            on = run_series(client, target=target, method=args.method, prompts=prompts, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens).summary()
            on["speedup_vs_off"] = round(on["tokens_per_s"] / off["tokens_per_s"], 3) if off["tokens_per_s"] else None
            off["speedup_vs_off"] = 1.0
            rows += [off, on]
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
                },
                "server": info,
            },
        )
        eprint(f"[bench] wrote {args.output}")
    return 0

