"""Render the README's benchmark tables from bench/results/*.json (so no number in the
README is typed by hand). Usage: python -m tandem.bench.scripts.tables [RESULTS_DIR]"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _machine(m: dict) -> str:
    return f"{m.get('cpu', '?')}, {m.get('threads')} threads, torch {m.get('torch')}"


def local_table(d: dict) -> str:
    from tandem.bench.bench import format_table

    c = d["config"]
    head = (
        f"`tandem bench` in-process, {c['prompts'].split('/')[-1]} (first {c['limit']} prompts, "
        f"{c['max_new_tokens']} new tokens, greedy, {c['dtype']}); target {c['target']}, draft {c['draft']} "
        f"({c['draft_quantize']}); machine: {_machine(d['machine'])}."
    )
    extra = []
    for r in d["results"]:
        if r.get("thread_split"):
            extra.append(f"{r['method']}: threads target/draft {r['thread_split']['target']}/{r['thread_split']['draft']}")
    return head + "\n\n" + format_table(d["results"]) + ("\n\n" + "; ".join(extra) if extra else "")


def actors_table(d: dict) -> str:
    c = d["config"]
    lines = [
        f"`tandem bench --via actors`, {c['prompts'].split('/')[-1]} (first {c['limit']} prompts, {c['max_new_tokens']} "
        f"new tokens, greedy, {c['dtype']}): one draft actor and one target actor, 1 torch thread each "
        f"(on 2 cores PEARL needs both at once; a thread more per actor would oversubscribe), baselines "
        f"in-process with 2 threads; machine: {_machine(d['machine'])}.",
        "",
        "| method | tok/s | x hf-ar | x hf-assisted | mean acc. len | overhead per round | aggregate tok/s, 4 in flight | x one at a time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["results"]:
        conc = r.get("concurrent") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    r["method"],
                    f"{r['tokens_per_s']:.2f}",
                    f"{r['speedup_vs_hf_ar']:.2f}" if r.get("speedup_vs_hf_ar") else "-",
                    f"{r['speedup_vs_hf_assisted']:.2f}" if r.get("speedup_vs_hf_assisted") else "-",
                    f"{r['mean_accepted_len']:.2f}" if r.get("mean_accepted_len") else "-",
                    f"{100 * r['overhead_frac']:.1f}%" if r.get("overhead_frac") is not None else "-",
                    f"{conc['aggregate_tokens_per_s']:.2f}" if conc else "-",
                    f"{conc['gain_vs_one_at_a_time']:.2f}" if conc else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def grpc_table(d: dict) -> str:
    from tandem.bench.grpc_bench import format_table

    c = d["config"]
    return (
        f"`tandem bench --via grpc` against `make serve` (both default targets, shared int4 0.5B draft), "
        f"{c['prompts'].split('/')[-1]} (first {c['limit']} prompts, {c['max_new_tokens']} new tokens, "
        f"{c['concurrency']} client, {c['warmup']} warm-up requests per target first):\n\n" + format_table(d["results"])
    )


def router_exit_check(grpc: dict, report: dict) -> str:
    """Per target: the exit the router settled on over gRPC against the best fixed exit
    measured offline by `tandem exit-report` (code_dev: replayed acceptance of each exit of
    the trained draft, priced with that machine's measured draft and verify costs)."""
    lines = [
        "| target | router settled on | offline best fixed exit | predicted tok/s, settled / best | within 10% |",
        "|---|---|---|---|---|",
    ]
    for row in grpc["results"]:
        if row["method"] == "off" or row.get("settled_exit") is None:
            continue
        t_rep = report["targets"].get(row["target"])
        if not t_rep or "code_dev" not in t_rep["datasets"]:
            continue
        per_exit = t_rep["datasets"]["code_dev"]["per_exit"]
        rates = {int(k.split("_")[0]): v["predicted_tok_s"] for k, v in per_exit.items() if k.endswith("_after")}
        best = max(rates, key=rates.get)
        settled = int(row["settled_exit"])
        ratio = rates.get(settled, 0.0) / rates[best] if rates[best] else 0.0
        lines.append(
            f"| {row['target']} | {settled} | {best} | {rates.get(settled, 0.0):.2f} / {rates[best]:.2f} = {ratio:.2f} | "
            f"{'yes' if ratio >= 0.9 else 'no'} |"
        )
    return "\n".join(lines)


def batch_table(results: Path) -> str:
    rows = []
    for m in ("off", "auto"):
        f = results / f"batch_{m}.summary.json"
        if f.exists():
            s = json.loads(f.read_text())
            rows.append((m, s))
    if not rows:
        return ""
    lines = [
        "| speculation | records | records/s | tokens/s | x off |",
        "|---|---|---|---|---|",
    ]
    base = rows[0][1]["tokens_per_s"] if rows[0][0] == "off" else None
    for m, s in rows:
        lines.append(
            f"| {m} | {s['generated']} | {s['records_per_s']:.3f} | {s['tokens_per_s']:.2f} | "
            f"{(s['tokens_per_s'] / base) if base else 1:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    results = Path(argv[0] if argv else "bench/results")
    for name, fn in (("code_dev_local.json", local_table), ("code_dev_actors.json", actors_table), ("code_dev_grpc.json", grpc_table)):
        f = results / name
        if f.exists():
            print(f"<!-- {name} -->\n" + fn(json.loads(f.read_text())) + "\n")
    g, r = results / "code_dev_grpc.json", results / "exit_report" / "report.json"
    if g.exists() and r.exists():
        print("<!-- router exit -->\n" + router_exit_check(json.loads(g.read_text()), json.loads(r.read_text())) + "\n")
    bt = batch_table(results)
    if bt:
        print("<!-- batch -->\n" + bt + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
