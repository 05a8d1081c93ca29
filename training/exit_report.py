"""`tandem exit-report`: what trained exits buy, per exit and per target.

Why one module of ~580 lines: one report, from replay to rendered markdown and plot; it is
a command beside the trainer, never imported by serving.

Glossary
- draft variants: *before* = the bare exits of the draft (first k layers, the shared final
  norm and the full LM head: what S2D gets untrained); *after* = the trained exit adapters
  and, when the adapter folder has one, the frequent-token head.
- replay (greedy): under greedy decoding every accepted draft token equals the target's
  token, so a draft token is always drafted after a prefix of the target's own output. One
  teacher-forced pass of the draft over the target's greedy output (in blocks of at most 8
  tokens, the int4 kernels' decode path) gives, at every position and every exit, the
  draft's token and its max probability; rounds of `sd` (or of an S2D policy) are then
  simulated exactly: a round accepts the leading draft tokens that equal the target's and
  commits one more. This gives mean accepted lengths per exit and per policy for the cost
  of one draft pass, instead of one generation per exit.
- draft cost per token at exit k: a one-token forward to depth k plus that exit's adapter,
  norm and head, 20th percentile of repeated steps on this machine. Verification cost: one target
  forward over draft_len + 1 tokens, same statistic.
- predicted tokens/s: emitted / (rounds x verify + drafted tokens x their draft cost), from
  the replay and the measured costs.

Per target, an S2D policy (exits and thresholds) and draft_len are tuned on *tuning* prompts
(the prompts after the first --limit of each prompt set, never the ones reported) by the
predicted tokens/s; then real generations on the reported prompts measure `ar`, `sd` from
the full draft (before: the default draft; after: with the frequent-token head), `sorted`
with the tuned policy, and `sd` from the best single trained exit, with greedy equality to
`ar` checked token for token.

Writes report.json, report.md and exit_report.png (acceptance against draft cost, one panel
per target) into --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from tandem.deploy.packs import DRAFT_QUANTIZE_DEFAULT, QUANTIZE_SETTINGS
from tandem.deploy.paths import EVAL_DIR
from tandem.deploy.exits import default_exits_dir

DEFAULT_TARGETS = "qwen2.5-coder-1.5b-instruct,qwen2.5-coder-0.5b-instruct"
DEFAULT_DATASETS = (str(EVAL_DIR / "code_dev.jsonl"), str(EVAL_DIR / "spec_bench_dev.jsonl"))
THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DRAFT_LEN_GRID = (1, 2, 3, 4, 6, 8)  # as the router: short drafts pay when a cheap exit accepts little
REPLAY_BLOCK = 8  # <= QuantLinear.QUANT_MAX_ROWS: the same kernels as one-token drafting


def parse_policy(text: str):
    """'8,12,24:0.9,0.7' -> ExitPolicy(exits=(8, 12, 24), thresholds=(0.9, 0.7))."""
    from tandem.speculation.sorted_policy import ExitPolicy

    exits_text, _, thr_text = text.partition(":")
    exits = tuple(int(x) for x in exits_text.split(",") if x.strip())
    thresholds = tuple(float(x) for x in thr_text.split(",") if x.strip())
    return ExitPolicy(exits=exits, thresholds=thresholds)


def policy_text(policy) -> str:
    return ",".join(map(str, policy.exits)) + (":" + ",".join(f"{t:g}" for t in policy.thresholds) if policy.thresholds else "")


def load_prompts(path: str, start: int, count: int) -> list[str]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if rec.get("turns"):
                    out.append(str(rec["turns"][0]))
    return out[start : start + count]


# ----------------------------------------------------------------------------------------
# Replay and simulation (pure functions over arrays)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """One prompt's teacher-forced draft pass. target: [n] the target's greedy tokens;
    per exit: draft token [n] and max probability [n] at each position."""

    target: torch.Tensor
    tokens: dict[int, torch.Tensor]
    max_prob: dict[int, torch.Tensor]


@torch.inference_mode()
def replay_draft(runner, prompt: Sequence[int], target_tokens: Sequence[int], exits: Sequence[int]) -> Replay:
    """Run the draft over prompt + target tokens; record each exit's greedy token and max
    probability for every target position (the prediction after the preceding tokens)."""
    n = len(target_tokens)
    seq = runner.new_sequence(len(prompt) + n + 16)
    if len(prompt) > 1:
        runner.extend(seq, list(prompt[:-1]), all_logits=False)
    inputs = [int(prompt[-1])] + [int(t) for t in target_tokens[:-1]]  # input i predicts target i
    exits = sorted(exits)
    toks = {e: [] for e in exits}
    probs = {e: [] for e in exits}
    ids_map = runner.head_ids
    for lo in range(0, n, REPLAY_BLOCK):
        block = inputs[lo : lo + REPLAY_BLOCK]
        h = runner.forward_to_depth([seq], [block], depth=exits[0])[0]
        for i, e in enumerate(exits):
            if i > 0:
                h = runner.continue_to_depth(seq, h, from_depth=exits[i - 1], depth=e)
            p = torch.softmax(runner.logits_at_exit(h, e), dim=-1)  # [len(block), head]
            mp, col = p.max(-1)
            toks[e].append(ids_map[col] if ids_map is not None else col)
            probs[e].append(mp)
    return Replay(
        target=torch.tensor([int(t) for t in target_tokens]),
        tokens={e: torch.cat(v) for e, v in toks.items()},
        max_prob={e: torch.cat(v) for e, v in probs.items()},
    )


def simulate(replays: Sequence[Replay], *, exits: Sequence[int], thresholds: Sequence[float], draft_len: int,
             token_ms: dict[int, float], head_ms: dict[int, float], layers_ms: dict[int, float],
             verify_ms: float) -> dict[str, float]:
    """Greedy S2D rounds over replays (a single exit when len(exits) == 1).

    Per draft token the exits run in order until one's max probability reaches its
    threshold (the last always emits); it costs the layers to that exit plus one head per
    exit tried. A round accepts the leading draft tokens equal to the target's and commits
    one more token (correction or bonus). Returns rounds, emitted, drafted, mean accepted
    length, draft ms per drafted token and predicted tokens/s."""
    rounds = emitted = drafted = 0
    draft_ms = 0.0
    for rp in replays:
        n = rp.target.numel()
        target = rp.target.tolist()
        toks = {e: rp.tokens[e].tolist() for e in exits}
        conf = {e: rp.max_prob[e].tolist() for e in exits}
        pos = 0
        while pos < n:
            g = min(draft_len, n - pos - 1)
            accepted, ok = 0, True
            for t in range(g):
                p = pos + t
                for i, e in enumerate(exits):
                    if i == len(exits) - 1 or conf[e][p] >= thresholds[i]:
                        break
                # layers to the emitting exit, plus the head of every exit tried on the way
                draft_ms += (layers_ms[e] + sum(head_ms[x] for x in exits[: i + 1])) if len(exits) > 1 else token_ms[e]
                if ok and toks[e][p] == target[p]:
                    accepted += 1
                else:
                    ok = False
            drafted += g
            rounds += 1
            step = accepted + 1
            emitted += min(step, n - pos)
            pos += step
    total_ms = rounds * verify_ms + draft_ms
    return {
        "rounds": rounds, "emitted": emitted, "drafted": drafted,
        "mean_accepted_len": round(emitted / rounds, 3) if rounds else 0.0,
        "draft_ms_per_token": round(draft_ms / drafted, 2) if drafted else 0.0,
        "predicted_tok_s": round(1000 * emitted / total_ms, 2) if total_ms else 0.0,
    }


def ceiling(replays: Sequence[Replay], *, full: int, trained: Sequence[int], costs: dict[str, dict[int, float]],
            draft_len: int, verify_ms: float) -> dict[str, Any]:
    """What perfect exit training could buy at most: the full draft's own drafts (its
    acceptance, from the replay) charged at exit k's cost per token, and at no cost at all,
    against the full draft at its own cost; predicted tokens/s and the ratio. A bar above
    the ratio at every trained exit cannot be met by training those exits."""
    def run(token_ms: float) -> float:
        return simulate(replays, exits=(full,), thresholds=(), draft_len=draft_len, token_ms={full: token_ms}, head_ms=costs["head"],
                        layers_ms=costs["layers"], verify_ms=verify_ms)["predicted_tok_s"]

    base = run(costs["token"][full]) or 1e-9
    out: dict[str, Any] = {"draft_len": draft_len, "sd_full_predicted_tok_s": base}
    for name, ms in [(str(e), costs["token"][e]) for e in trained] + [("free", 0.0)]:
        tok_s = run(ms)
        out[name] = {"predicted_tok_s": tok_s, "x_sd_full": round(tok_s / base, 3)}
    return out


def tune_policy(replays: Sequence[Replay], *, trained: Sequence[int], full: int, costs: dict[str, dict[int, float]],
                verify_ms: dict[int, float], single_only: bool = False) -> tuple[str, int, dict[str, float]]:
    """The (policy, draft_len) with the best predicted tokens/s on tuning replays. Candidates:
    the full draft alone, each trained exit alone, and S2D policies of one or two trained
    exits followed by the full depth, thresholds on THRESHOLD_GRID."""
    cands: list[tuple[tuple[int, ...], tuple[float, ...]]] = [((e,), ()) for e in trained]
    if not single_only:
        cands.append(((full,), ()))
        for k in (1, 2):
            for sub in itertools.combinations(sorted(trained), k):
                for thr in itertools.product(THRESHOLD_GRID, repeat=k):
                    if k == 2 and thr[0] < thr[1]:
                        continue  # a shallower exit is held to at least the deeper one's bar
                    cands.append((sub + (full,), thr))
    best = None
    for (exits, thr), draft_len in itertools.product(cands, DRAFT_LEN_GRID):
        sim = simulate(replays, exits=exits, thresholds=thr, draft_len=draft_len, token_ms=costs["token"], head_ms=costs["head"],
                       layers_ms=costs["layers"], verify_ms=verify_ms[draft_len])
        if best is None or sim["predicted_tok_s"] > best[2]["predicted_tok_s"]:
            best = (",".join(map(str, exits)) + (":" + ",".join(f"{t:g}" for t in thr) if thr else ""), draft_len, sim)
    assert best is not None
    return best


# ----------------------------------------------------------------------------------------
# Costs
# ----------------------------------------------------------------------------------------


def _low(xs: list[float]) -> float:
    """The 20th percentile: on a shared machine, other processes only ever add time, so a
    low percentile estimates the cost itself better than the median does."""
    xs = sorted(xs)
    return xs[len(xs) // 5]


@torch.inference_mode()
def draft_costs(runner, exits: Sequence[int], *, context: int = 64, reps: int = 30) -> dict[str, dict[int, float]]:
    """Per exit, in ms (20th percentile of repeated steps): layers (one-token forward to the
    exit), head (adapter, norm and head on one row), token (the two: one draft step at that
    exit). The exits are measured interleaved, so a burst of load from other processes
    touches all of them alike."""
    seqs = {}
    for e in exits:
        seqs[e] = runner.new_sequence(context + 8)
        runner.extend(seqs[e], list(range(100, 100 + context)), all_logits=False)
    lt: dict[int, list[float]] = {e: [] for e in exits}
    ht: dict[int, list[float]] = {e: [] for e in exits}
    for i in range(reps + 2):
        for e in exits:
            t0 = time.perf_counter()
            h = runner.forward_to_depth([seqs[e]], [[200 + i]], depth=e)[0]
            t1 = time.perf_counter()
            runner.logits_at_exit(h[-1:], e)
            t2 = time.perf_counter()
            runner.rollback(seqs[e], context)
            if i >= 2:  # warm-up steps are not counted
                lt[e].append(t1 - t0)
                ht[e].append(t2 - t1)
    out: dict[str, dict[int, float]] = {"layers": {}, "head": {}, "token": {}}
    for e in exits:
        out["layers"][e] = round(1000 * _low(lt[e]), 3)
        out["head"][e] = round(1000 * _low(ht[e]), 3)
        out["token"][e] = round(out["layers"][e] + out["head"][e], 3)
    return out


def min_costs(a: dict[str, dict[int, float]] | None, b: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """Elementwise minimum of two cost measurements (taken at different times)."""
    if a is None:
        return b
    out = {k: {e: min(a[k][e], b[k][e]) for e in b[k]} for k in ("layers", "head")}
    out["token"] = {e: round(out["layers"][e] + out["head"][e], 3) for e in out["layers"]}
    return out


@torch.inference_mode()
def verify_cost_ms(runner, n_tokens: int, *, context: int = 128, reps: int = 10) -> float:
    seq = runner.new_sequence(context + n_tokens + 8)
    runner.extend(seq, list(range(100, 100 + context)), all_logits=False)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        runner.extend(seq, list(range(300, 300 + n_tokens)))
        times.append(time.perf_counter() - t0)
        runner.rollback(seq, context)
    return round(1000 * _low(times[1:]), 2)


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem exit-report", description="Acceptance and draft cost per exit, before and after exit training.")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="draft model (pack name, folder, hub id)")
    p.add_argument("--exit-adapters", default=None, help="trained exit folder (default: $TANDEM_CACHE/exits/<draft>)")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated target models")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_DATASETS), help="JSONL prompt files (turns)")
    p.add_argument("--limit", type=int, default=3, help="reported prompts per prompt set (the first N)")
    p.add_argument("--tune-limit", type=int, default=2, help="tuning prompts per prompt set (the N after the reported ones); 0: no tuning")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--draft-len", type=int, default=4, help="draft tokens per round for the per-exit table")
    p.add_argument("--sd-draft-len", type=int, default=6, help="draft tokens per round of the sd-full baseline (tandem's default)")
    p.add_argument("--policy", action="append", default=[], help="TARGET=EXITS:THRESHOLDS@GAMMA: use this sorted policy instead of tuning (repeatable)")
    p.add_argument("--draft-quantize", choices=QUANTIZE_SETTINGS, default=DRAFT_QUANTIZE_DEFAULT,
                   help="as tandem serve's draft pool; auto: the pack's own grid for packs, int4 otherwise")
    p.add_argument("--target-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", required=True, help="output folder for report.json, report.md, exit_report.png")
    return p


def _log(msg: str) -> None:
    print(f"[exit-report] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tandem.actors.exit_adapters import check_runner_matches, load_exit_adapters, read_manifest
    from tandem.actors.devices import available_threads
    from tandem.actors.local import LocalEngine
    from tandem.actors.loading import load_causal_lm
    from tandem.actors.runner import ModelRunner
    from tandem.deploy.models import encode_prompt, stop_ids_for, tokenizer_for
    from tandem.deploy.pack_grid import draft_quantize, resolver_for
    from tandem.deploy.packs import resolve_model_path
    from tandem.speculation.sampling import SamplingParams
    from tandem.speculation.sorted_policy import ExitPolicy

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or available_threads()
    torch.set_num_threads(threads)
    adapters_dir = Path(args.exit_adapters) if args.exit_adapters else default_exits_dir(args.draft)
    try:
        manifest = read_manifest(adapters_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"exit-report: {exc} (train them with `tandem train-exits --draft {args.draft} --exits 8,12,16 --output {adapters_dir}`)", file=sys.stderr)
        return 2
    given: dict[str, tuple[str, int]] = {}
    for item in args.policy:
        t, _, rest = item.partition("=")
        pol, _, g = rest.partition("@")
        parse_policy(pol)  # a clear error before any loading
        given[t] = (pol, int(g or args.sd_draft_len))
    adapters, trained, head_ids = load_exit_adapters(adapters_dir, "bfloat16")
    quant = draft_quantize(args.draft, args.draft_quantize)
    draft_path = resolver_for(resolve_model_path, quant)(args.draft)

    _log(f"loading draft {args.draft} ({quant or 'none'}): bare exits and trained exits")
    hf = load_causal_lm(draft_path, torch.bfloat16)
    full = int(hf.config.num_hidden_layers)
    exits = tuple(sorted(set(trained) | {full}))
    drafts = {
        "before": ModelRunner(draft_path, dtype="bfloat16", quantize=quant, exits=exits, model=hf),
        "after": ModelRunner(draft_path, dtype="bfloat16", quantize=quant, exits=exits, model=hf, head_ids=head_ids, exit_adapters=adapters),
    }
    del hf
    check_runner_matches(adapters_dir, drafts["after"])
    costs = {v: draft_costs(r, exits) for v, r in drafts.items()}
    _log(f"draft ms/token: { {v: c['token'] for v, c in costs.items()} }")

    def remeasure() -> None:  # costs are the minimum over measurements spread in time
        for v, r in drafts.items():
            costs[v] = min_costs(costs[v], draft_costs(r, exits))

    tokenizer = tokenizer_for(args.draft)
    greedy = SamplingParams(temperature=0.0)
    report: dict[str, Any] = {
        "draft": args.draft, "adapters": str(adapters_dir), "draft_quantize": quant or "none",
        "head_size": None if head_ids is None else int(head_ids.numel()), "threads": threads,
        "limit": args.limit, "tune_limit": args.tune_limit, "max_new_tokens": args.max_new_tokens, "draft_len": args.draft_len,
        "sd_draft_len": args.sd_draft_len, "exits": list(exits),
        "draft_costs_ms": {v: {k: {str(e): x for e, x in d.items()} for k, d in c.items()} for v, c in costs.items()},
        "training": manifest.get("training", {}), "targets": {},
    }
    sets = {Path(d).stem: d for d in args.prompts}
    for target_ref in [t for t in args.targets.split(",") if t]:
        target_path = resolve_model_path(target_ref)
        _log(f"loading target {target_ref} ({args.target_dtype})")
        target = ModelRunner(target_path, dtype=args.target_dtype)
        stop_ids = stop_ids_for(tokenizer, target_path)
        verify_ms = {g: verify_cost_ms(target, g + 1) for g in sorted(set(DRAFT_LEN_GRID) | {args.draft_len, args.sd_draft_len})}
        remeasure()
        _log(f"verify ms: {verify_ms}; draft ms/token: { {v: c['token'] for v, c in costs.items()} }")
        engines = {v: LocalEngine(target, r, threads=threads) for v, r in drafts.items()}
        t_rep: dict[str, Any] = {"verify_ms": {str(g + 1): ms for g, ms in verify_ms.items()}, "datasets": {}}

        def generate(variant: str, ids: list[int], **kw):
            return engines[variant].generate(ids, sampling=greedy, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids, **kw)

        try:
            # Tune the sorted policy on prompts that are not reported.
            if target_ref in given:
                pol, draft_len_s = given[target_ref]
                t_rep["policy"] = {"policy": pol, "draft_len": draft_len_s, "source": "--policy"}
                single = None
            elif args.tune_limit > 0:
                tune_replays = []
                for path in sets.values():
                    for text in load_prompts(path, args.limit, args.tune_limit):
                        ids = encode_prompt(tokenizer, prompt=text)
                        ar = generate("after", ids, method="ar")
                        tune_replays.append(replay_draft(drafts["after"], ids, ar.tokens, exits))
                pol, draft_len_s, sim = tune_policy(tune_replays, trained=trained, full=full, costs=costs["after"], verify_ms=verify_ms)
                single, draft_len_1, sim_1 = tune_policy(tune_replays, trained=trained, full=full, costs=costs["after"], verify_ms=verify_ms, single_only=True)
                t_rep["policy"] = {"policy": pol, "draft_len": draft_len_s, "source": "tuned", "tuning": sim}
                t_rep["best_single_exit"] = {"policy": single, "draft_len": draft_len_1, "tuning": sim_1}
                _log(f"{target_ref}: tuned sorted {pol} @ draft_len {draft_len_s} {sim}; best single exit {single} @ {draft_len_1} {sim_1}")
            else:
                pol, draft_len_s, single = None, args.sd_draft_len, None

            for ds_name, path in sets.items():
                rows: dict[str, Any] = {}
                prompts = [encode_prompt(tokenizer, prompt=text) for text in load_prompts(path, 0, args.limit)]
                # Methods interleaved per prompt: a burst of load from other processes then
                # slows every method alike instead of one.
                methods: list[tuple[str, str, dict]] = [
                    ("ar", "before", {"method": "ar"}),
                    ("sd_full_before", "before", {"method": "sd", "draft_len": args.sd_draft_len, "policy": ExitPolicy.single(full)}),
                    ("sd_full_after", "after", {"method": "sd", "draft_len": args.sd_draft_len, "policy": ExitPolicy.single(full)}),
                ]
                if pol is not None:
                    policy = parse_policy(pol)
                    methods.append(("sorted_after", "after", {"method": "sorted" if len(policy.exits) > 1 else "sd", "draft_len": draft_len_s, "policy": policy}))
                if single is not None:
                    methods.append(("best_exit_after", "after", {"method": "sd", "draft_len": draft_len_1, "policy": parse_policy(single)}))
                runs: dict[str, list] = {key: [] for key, _, _ in methods}
                for ids in prompts:
                    for key, variant, kw in methods:
                        runs[key].append(generate(variant, ids, **kw))
                for key, results in runs.items():
                    rows[key] = _speed(results, runs["ar"])
                    _log(f"{target_ref} {ds_name} {key}: {rows[key]}")
                # Per-exit acceptance by replay over the target's greedy output.
                ar_tokens = [r.tokens for r in runs["ar"]]
                per_exit: dict[str, Any] = {}
                replays = {v: [replay_draft(drafts[v], ids, toks, exits) for ids, toks in zip(prompts, ar_tokens)] for v in drafts}
                for e in exits:
                    for v in drafts:
                        per_exit[f"{e}_{v}"] = simulate(replays[v], exits=(e,), thresholds=(), draft_len=args.draft_len, token_ms=costs[v]["token"],
                                                         head_ms=costs[v]["head"], layers_ms=costs[v]["layers"], verify_ms=verify_ms[args.draft_len])
                # Replay check: the replayed sd-full acceptance against the real run's.
                check = simulate(replays["before"], exits=(full,), thresholds=(), draft_len=args.sd_draft_len, token_ms=costs["before"]["token"],
                                 head_ms=costs["before"]["head"], layers_ms=costs["before"]["layers"], verify_ms=verify_ms[args.sd_draft_len])
                rows["replay_check_sd_full_before"] = {"replayed": check["mean_accepted_len"], "real": rows["sd_full_before"]["mean_accepted_len"]}
                t_rep["datasets"][ds_name] = {"speed": rows, "per_exit": per_exit,
                                              "ceiling": ceiling(replays["after"], full=full, trained=trained, costs=costs["after"],
                                                                 draft_len=args.sd_draft_len, verify_ms=verify_ms[args.sd_draft_len])}
        finally:
            for eng in engines.values():
                eng.close()
        report["targets"][target_ref] = t_rep
        report["draft_costs_ms"] = {v: {k: {str(e): x for e, x in d.items()} for k, d in c.items()} for v, c in costs.items()}
        del target, engines
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")  # partial results survive

    (out / "report.md").write_text(render_markdown(report))
    plot(report, out / "exit_report.png")
    _log(f"wrote {out / 'report.json'}, {out / 'report.md'} and {out / 'exit_report.png'}")
    print((out / "report.md").read_text())
    return 0


def _speed(results: list, ar: list | None) -> dict[str, Any]:
    tokens = sum(len(r.tokens) for r in results)
    seconds = sum(r.total_s for r in results)
    rounds = sum(r.stats.rounds for r in results)
    emitted = sum(r.stats.emitted for r in results)
    drafted = sum(r.stats.drafted for r in results)
    row = {
        "tokens": tokens,
        "tok_s": round(tokens / seconds, 3) if seconds else 0.0,
        "mean_accepted_len": round(emitted / rounds, 3) if rounds else 0.0,
        "draft_ms_per_drafted": round(1000 * sum(r.draft_s for r in results) / drafted, 2) if drafted else 0.0,
        "exits_used": _merge_exits(results),
    }
    if ar is not None:
        row["greedy_equal"] = sum(list(r.tokens) == list(a.tokens) for r, a in zip(results, ar))
        row["prompts"] = len(results)
    return row


def _merge_exits(results: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        for e, n in r.stats.exits_used.items():
            out[str(e)] = out.get(str(e), 0) + n
    return out


def _short(ref: str) -> str:
    return ref.replace("qwen2.5-coder-", "").replace("-instruct", "")


def render_markdown(report: dict[str, Any]) -> str:
    exits = report["exits"]
    cost = report["draft_costs_ms"]
    lines = [
        f"# Trained exits: {report['draft']} ({report['draft_quantize']} draft; after training: exit adapters + "
        f"{report['head_size'] or 'full'}-token head)",
        "",
        f"Greedy, first {report['limit']} prompts of each set, {report['max_new_tokens']} new tokens, {report['threads']} threads. "
        f"*acc len*: tokens committed per verification round of `sd` drafting {report['draft_len']} tokens from one exit "
        "(replayed over the target's greedy output: exact for greedy); *draft ms/tok*: one one-token draft step at the exit "
        "(20th percentile of repeated steps); before = bare exit with the full head, after = trained adapter + frequent-token head.",
        "",
    ]
    tr = report.get("training") or {}
    if tr.get("val_before") and tr.get("val_after"):
        lines += ["Held-out validation, KL(full draft || exit) on the head subset and top-1 agreement with the full draft:", "",
                  "| exit | KL before | KL after | top-1 before | top-1 after |", "|---|---|---|---|---|"]
        for e, vb in tr["val_before"].items():
            va = tr["val_after"].get(e, {})
            lines.append(f"| {e} | {vb['kl']:.3f} | {va.get('kl', float('nan')):.3f} | {vb['top1_agree']:.3f} | {va.get('top1_agree', float('nan')):.3f} |")
        lines += ["", f"Training: {tr.get('steps')} steps, {tr.get('tokens')} tokens, {tr.get('elapsed_s')} s of training steps; "
                  f"head coverage {json.dumps(tr.get('head_coverage'))}", ""]
    for target, t_rep in report["targets"].items():
        pol = t_rep.get("policy") or {}
        for ds, d in t_rep["datasets"].items():
            pe, sp = d["per_exit"], d["speed"]
            lines += [f"## target {_short(target)}, {ds}", "",
                      "| exit | draft ms/tok before | after | acc len before | after |", "|---|---|---|---|---|"]
            for e in exits:
                b, a = pe.get(f"{e}_before"), pe.get(f"{e}_after")
                if b and a:
                    lines.append(f"| {e} | {cost['before']['token'][str(e)]:.1f} | {cost['after']['token'][str(e)]:.1f} | "
                                 f"{b['mean_accepted_len']:.2f} | {a['mean_accepted_len']:.2f} |")
            ar = sp["ar"]["tok_s"] or 1e-9
            full = sp["sd_full_before"]["tok_s"] or 1e-9
            labels = [("ar", "ar"), ("sd_full_before", f"sd, full draft, full head (draft_len {report['sd_draft_len']})"),
                      ("sd_full_after", f"sd, full draft, frequent-token head (draft_len {report['sd_draft_len']})"),
                      ("sorted_after", f"{'sorted' if ':' in str(pol.get('policy')) else 'sd, exit'} {pol.get('policy')} @ draft_len "
                                       f"{pol.get('draft_len')}, trained draft ({pol.get('source', '')} policy)"),
                      ("best_exit_after", f"sd, best single trained exit {(t_rep.get('best_single_exit') or {}).get('policy')} "
                                          f"@ draft_len {(t_rep.get('best_single_exit') or {}).get('draft_len')}")]
            lines += ["", "| method | tok/s | x ar | x sd-full | acc len | exits used | greedy = ar |", "|---|---|---|---|---|---|---|"]
            for key, label in labels:
                if key in sp:
                    r = sp[key]
                    lines.append(f"| {label} | {r['tok_s']:.2f} | {r['tok_s'] / ar:.2f} | {r['tok_s'] / full:.2f} | "
                                 f"{r['mean_accepted_len']:.2f} | {r.get('exits_used') or '-'} | {r.get('greedy_equal', '-')}/{r.get('prompts', '-')} |")
            ceil = d.get("ceiling")
            if ceil:
                parts = [f"exit {k} {v['x_sd_full']:.2f}x" for k, v in ceil.items() if isinstance(v, dict) and k != "free"]
                lines += ["", f"Ceiling of exit training (replay: the full draft's own drafts at a trained exit's cost per token, "
                              f"draft_len {ceil['draft_len']}; perfect training could not do better): {', '.join(parts)} "
                              f"the full draft's predicted speed; a draft that cost nothing: {ceil['free']['x_sd_full']:.2f}x."]
            chk = sp.get("replay_check_sd_full_before")
            if chk:
                lines += ["", f"Replay check (sd, full draft): replayed acc len {chk['replayed']:.2f}, real run {chk['real']:.2f}."]
            lines.append("")
    lines += ["![acceptance against draft cost](exit_report.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(report["targets"])
    fig, axes = plt.subplots(1, max(1, len(targets)), figsize=(6 * max(1, len(targets)), 4.5), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    cost = report["draft_costs_ms"]
    exits = report["exits"]
    for ax, target in zip(axes[0], targets):
        for ci, (ds, d) in enumerate(report["targets"][target]["datasets"].items()):
            c = colors[ci % len(colors)]
            for e in exits:
                b, a = d["per_exit"].get(f"{e}_before"), d["per_exit"].get(f"{e}_after")
                if not (b and a):
                    continue
                xb, yb = cost["before"]["token"][str(e)], b["mean_accepted_len"]
                xa, ya = cost["after"]["token"][str(e)], a["mean_accepted_len"]
                ax.scatter([xb], [yb], facecolors="none", edgecolors=c, s=50)
                ax.scatter([xa], [ya], color=c, s=50, label=ds if e == exits[0] else None)
                ax.annotate("", xy=(xa, ya), xytext=(xb, yb), arrowprops={"arrowstyle": "->", "color": c, "alpha": 0.5})
                ax.annotate(str(e), (xa, ya), textcoords="offset points", xytext=(5, 4), fontsize=8, color=c)
        ax.set_title(f"target {_short(target)}: hollow = bare exit, filled = trained")
        ax.set_xlabel("draft cost per token (ms, one-token step)")
        ax.set_ylabel(f"mean accepted length (draft_len={report['draft_len']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
