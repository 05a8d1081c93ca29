"""`tandem bench`: every method side by side on the same prompts, in one process, against
the baselines a user would otherwise pick (transformers autoregressive `hf-ar` and
transformers assisted generation `hf-assisted`), all in the same dtype and thread count.

Speed is reported as ratios measured in the same run, never as absolute promises. Greedy
fidelity is reported per method (prompts equal to hf-ar's output) together with the target's
top-1 minus top-2 logit margin at the first differing token, computed on hf-ar's path: in
bf16 a multi-token forward rounds differently from a one-token step, so outputs may part at
a near-tie (a margin of one or two bf16 steps); a large margin would be a bug.

Past ~400 lines because it is one command's flow, read top to bottom: the backends it runs
tandem's methods on, the baselines and peers beside them (llama.cpp's server itself lives in
bench/llama_peer.py, the `--via grpc` variant in bench/grpc_bench.py), the summary and table.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from tandem.speculation.sampling import SamplingParams
from tandem.speculation.stats import SpecStats

BASELINES = ("hf-ar", "hf-assisted", "llamacpp-ar", "llamacpp-spec")  # llamacpp-*: bench/llama_peer.py
TANDEM_METHODS = ("ar", "sd", "sorted", "pearl", "spectr")
DEFAULT_METHODS = "hf-ar,hf-assisted,ar,sd,sorted,pearl,spectr"


@dataclass
class MethodRun:
    """One method over all prompts."""

    method: str
    outputs: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    stats: SpecStats | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.seconds)
        return self.tokens / total if total > 0 else 0.0


def load_prompts(path: str | Path, limit: int | None) -> list[dict]:
    """Spec-Bench format (question_id, category, turns) or {"prompt": ...} / {"messages": ...}."""
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"prompts: {path}:{line_no} is not JSON: {exc}") from None
            if "turns" in rec:
                messages = [{"role": "user", "content": rec["turns"][0]}]
            elif "messages" in rec:
                messages = rec["messages"]
            elif "prompt" in rec:
                messages = [{"role": "user", "content": rec["prompt"]}]
            else:
                raise ValueError(f"prompts: {path}:{line_no} has none of turns, messages, prompt")
            records.append({"id": rec.get("question_id", f"line-{line_no}"), "messages": messages})
            if limit and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"prompts: {path} holds no prompts")
    return records


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def hf_last_logits(hf_model) -> Callable[[list[int]], torch.Tensor]:
    def last(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return hf_model(torch.tensor([ids])).logits[0, -1].float()

    return last


def runner_last_logits(runner) -> Callable[[list[int]], torch.Tensor]:
    """The served target's own logits (a target served at 4 bits is another model than the
    bf16 transformers one)."""
    return lambda ids: runner.prefill(runner.new_sequence(len(ids) + 1), ids).float().cpu()


def divergence_margin(last_logits: Callable[[list[int]], torch.Tensor], prompt_ids: Sequence[int], ref: Sequence[int], other: Sequence[int]) -> dict | None:
    """Top-1 minus top-2 target logit at the first position where `other` departs from
    `ref`, on ref's (the autoregressive) path. None when other is a prefix-equal output."""
    j = next((i for i, (a, b) in enumerate(zip(ref, other)) if a != b), None)
    if j is None:
        return None
    logits = last_logits(list(prompt_ids) + list(ref[:j]))
    top = torch.topk(logits, 2).values
    return {"position": j, "margin": round(float(top[0] - top[1]), 5)}


def _hf_generate(model, prompt_ids, *, max_new_tokens, sampling: SamplingParams, eos_ids, assistant=None) -> list[int]:
    kwargs: dict = {"max_new_tokens": max_new_tokens, "eos_token_id": list(eos_ids) or None, "pad_token_id": (list(eos_ids) or [0])[0]}
    if sampling.greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
    if assistant is not None:
        kwargs["assistant_model"] = assistant
    ids = torch.tensor([list(prompt_ids)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return out[0, ids.shape[1] :].tolist()


def run_baseline(name, *, hf_target, hf_draft, prompts_ids, max_new_tokens, sampling, eos_ids, threads, progress) -> MethodRun:
    torch.set_num_threads(threads)
    assistant = hf_draft if name == "hf-assisted" else None
    run = MethodRun(method=name)
    _hf_generate(hf_target, prompts_ids[0], max_new_tokens=16, sampling=sampling, eos_ids=eos_ids, assistant=assistant)  # warm-up
    for ids in prompts_ids:
        t0 = time.perf_counter()
        out = _hf_generate(hf_target, ids, max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids, assistant=assistant)
        run.seconds.append(time.perf_counter() - t0)
        run.outputs.append(out)
        progress(name)
    return run


def run_llama(method, *, binary, pack, draft, prompts_ids, max_new_tokens, sampling, threads, progress,
              concurrency: int = 1) -> MethodRun:
    """llama.cpp's llama-server on the packs' own GGUF (bench/llama_peer.py), greedy only:
    llamacpp-ar the target alone, llamacpp-spec with the draft pack as its draft model. With
    concurrency C > 1, then C requests in flight on a server with C slots (its continuous
    batching; one at a time ran on one slot, as llama-server serves a single user), measured
    as tandem's methods are (in_flight)."""
    from tandem.bench.llama_peer import LlamaServer

    if not sampling.greedy:
        raise ValueError(f"methods: {method} runs greedy only (temperature 0)")
    run = MethodRun(method=method)
    with LlamaServer(binary, pack, threads=threads, draft=draft if method == "llamacpp-spec" else None) as server:
        server.generate(prompts_ids[0][:1], max_new_tokens=16)  # warm-up, on no prompt's prefix
        for ids in prompts_ids:
            t0 = time.perf_counter()
            run.outputs.append(server.generate(ids, max_new_tokens=max_new_tokens))
            run.seconds.append(time.perf_counter() - t0)
            progress(method)
    run.extra["weights"] = "the packs' GGUF as stored"
    if concurrency > 1:
        with LlamaServer(binary, pack, threads=threads, parallel=concurrency,
                         draft=draft if method == "llamacpp-spec" else None) as server:
            server.generate(prompts_ids[0][:1], max_new_tokens=16)  # warm-up, on no prompt's prefix
            run.extra["concurrent"] = in_flight(lambda ids: server.generate(ids, max_new_tokens=max_new_tokens),
                                                prompts_ids=prompts_ids, concurrency=concurrency)
    return run


def run_tandem(name, *, generate: Callable, prompts_ids, max_new_tokens, sampling, progress) -> MethodRun:
    """`generate(ids, method, max_new_tokens, sampling) -> GenerationResult`."""
    run = MethodRun(method=name, stats=SpecStats())
    generate(prompts_ids[0], name, 16, sampling)  # warm-up
    rounds_s = critical_s = 0.0
    for ids in prompts_ids:
        res = generate(ids, name, max_new_tokens, sampling)
        run.seconds.append(res.total_s)
        run.ttft.append(res.prefill_s)
        run.outputs.append(list(res.tokens))
        run.stats.merge(res.stats)
        rounds_s += sum(res.per_round_s)
        critical_s += res.critical_s
        progress(name)
    if rounds_s > 0:
        # time per round outside the draft/target calls on its critical path
        run.extra["overhead_frac"] = round(max(0.0, 1 - critical_s / rounds_s), 4)
        run.extra["mean_round_ms"] = round(1000 * rounds_s / max(run.stats.rounds, 1), 1)
    return run


def summarize(runs: list[MethodRun], *, last_logits, prompts_ids, sampling, reference: str = "hf-ar") -> list[dict]:
    """reference: the run whose greedy output the others are compared with: hf-ar, or
    tandem's own ar when the target is served differently from transformers (quantize
    pack); last_logits gives that target's logits for the margins."""
    by_name = {r.method: r for r in runs}
    ref = by_name.get(reference)
    base_tps = by_name["hf-ar"].tokens_per_s if "hf-ar" in by_name else None
    assisted_tps = by_name["hf-assisted"].tokens_per_s if "hf-assisted" in by_name else None
    llama_tps = by_name["llamacpp-ar"].tokens_per_s if "llamacpp-ar" in by_name else None
    results = []
    for r in runs:
        row = {
            "method": r.method,
            "n_prompts": len(r.outputs),
            "tokens": r.tokens,
            "seconds": round(sum(r.seconds), 3),
            "tokens_per_s": round(r.tokens_per_s, 3),
            "speedup_vs_hf_ar": round(r.tokens_per_s / base_tps, 3) if base_tps else None,
            "speedup_vs_hf_assisted": round(r.tokens_per_s / assisted_tps, 3) if assisted_tps else None,
            "speedup_vs_llamacpp_ar": round(r.tokens_per_s / llama_tps, 3) if llama_tps else None,
            "mean_accepted_len": round(r.stats.mean_accepted_len, 3) if r.stats and r.stats.rounds else None,
            "acceptance_by_position": [round(a, 3) for a in r.stats.acceptance_by_position()] if r.stats else None,
            "greedy_equal": None,
            "divergence_margins": [],
            **r.extra,
        }
        if r.ttft:
            row["ttft_s_mean"] = round(sum(r.ttft) / len(r.ttft), 3)
        if r.stats and r.stats.exits_used:
            row["exits_used"] = {str(k): v for k, v in sorted(r.stats.exits_used.items())}
        if ref is not None and sampling.greedy:
            equal = 0
            for i, (a, b) in enumerate(zip(ref.outputs, r.outputs)):
                if a == b:
                    equal += 1
                    continue
                m = divergence_margin(last_logits, prompts_ids[i], a, b)
                if m is None:  # one output is a prefix of the other (a stop token differs)
                    m = {"position": min(len(a), len(b)), "margin": None}
                row["divergence_margins"].append({"prompt": i, **m})
            row["greedy_equal"] = equal
        results.append(row)
    return results


def format_table(results: list[dict]) -> str:
    cols = ["method", "tokens_per_s", "speedup_vs_hf_ar", "speedup_vs_hf_assisted", "mean_accepted_len", "greedy_equal"]
    head = ["method", "tok/s", "x hf-ar", "x hf-assisted", "mean acc. len", "greedy equal"]
    if any(r.get("speedup_vs_llamacpp_ar") is not None for r in results):  # the column only where llama.cpp ran
        cols.insert(4, "speedup_vs_llamacpp_ar")
        head.insert(4, "x llamacpp-ar")
    rows = []
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            if c == "greedy_equal":
                v = f"{v}/{r['n_prompts']}" if v is not None else "-"
                if r.get("divergence_margins"):
                    margins = [d["margin"] for d in r["divergence_margins"]]
                    v += f" (margins {', '.join(str(m) for m in margins)})"
            elif isinstance(v, float):
                v = f"{v:.2f}"
            elif v is None:
                v = "-"
            cells.append(str(v))
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in rows]
    return "\n".join(lines)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    allowed = set(BASELINES) | set(TANDEM_METHODS)
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise ValueError(f"methods: unknown {', '.join(bad)}; choose from {', '.join(sorted(allowed))}")
    if not methods:
        raise ValueError("methods: give at least one")
    return methods


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def eprint(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


class LocalBackend:
    """Methods run in this process (actors/local.py)."""

    via = "local"

    def __init__(self, *, args, hf_target, dtype: str, threads: int, exits: tuple[int, ...]):
        from tandem.actors.local import LocalEngine
        from tandem.deploy.models import ModelSpec, build_runner

        device = getattr(args, "device", "auto")  # tandem's runners; the transformers peers stay on the CPU
        from tandem.deploy.pack_grid import target_quantize

        tq = target_quantize(args.target, getattr(args, "target_quantize", "none"))
        target = build_runner(ModelSpec(ref=args.target, dtype=dtype, device=device, quantize=tq), model=hf_target)
        draft = build_runner(
            ModelSpec(ref=args.draft, dtype=dtype, device=device, quantize=_quant(args), exits=exits, exit_adapters=args.exit_adapters)
        )
        self.draft_exits = draft.exits
        self.target_runner = target
        self.engine = LocalEngine(target, draft, threads=threads)

    def generate(self, ids, method, max_new, sp, *, draft_len, policy, k, stop_ids):
        return self.engine.generate(
            ids, method=method, sampling=sp, max_new_tokens=max_new, draft_len=draft_len, policy=policy, k=k, stop_ids=stop_ids
        )

    def describe(self, method: str) -> dict:
        cache = self.engine.verifier.prefix_cache
        reused = {"prefix_tokens_reused": cache.tokens_reused} if cache is not None else {}
        if method != "pearl":
            return {"threads": self.engine.threads, **reused}
        split = self.engine.split
        return {"thread_split": {"target": split.target, "draft": split.draft, "window": split.window}, **reused}

    def forget_prompts(self) -> None:
        """Each method starts with no prompt prefixes kept (actors/prefix_cache.py), as the
        first did: the prompts are the same for every method."""
        if self.engine.verifier.prefix_cache is not None:
            self.engine.verifier.prefix_cache.clear()

    def close(self) -> None:
        self.engine.close()


class ActorBackend:
    """Methods run across Ray actor pools (actors/pools.py) on an embedded local Ray: one
    draft actor and one target replica (optionally sharded), each with its own threads."""

    via = "actors"

    def __init__(self, *, args, dtype: str, exits: tuple[int, ...]):
        from tandem.actors.engine import ActorEngine
        from tandem.actors.pools import DraftPool, DraftPoolSpec, TargetPool, TargetSpec, pool_resources
        from tandem.actors.remote import ensure_ray
        from tandem.actors.workers import ModelLoad
        from tandem.deploy.models import trained_exits_for
        from tandem.deploy.pack_grid import resolver_for, target_quantize
        from tandem.deploy.packs import resolve_model_path

        self.draft_threads = args.draft_threads
        self.target_threads = args.target_threads
        dq = _quant(args)
        dspec = DraftPoolSpec(
            load=ModelLoad(
                path=resolver_for(resolve_model_path, dq)(args.draft),
                dtype=dtype,
                quantize=dq,
                exits=exits,
                exit_adapters=trained_exits_for(args.draft, args.exit_adapters),
            ),
            threads=args.draft_threads,
        )
        tq = target_quantize(args.target, args.target_quantize) if args.shards == 1 else None
        tspec = TargetSpec(
            name="target",
            load=ModelLoad(path=resolver_for(resolve_model_path, tq)(args.target), dtype=dtype, quantize=tq),
            shards=args.shards,
            threads=args.target_threads,
        )
        ensure_ray(address=args.address, num_cpus=args.threads or None, resources=pool_resources(dspec, [tspec]))
        self.engine = ActorEngine(DraftPool(dspec), {"target": TargetPool(tspec)})
        self.draft_exits = tuple(self.engine.draft_pool.info["exits"])

    def generate(self, ids, method, max_new, sp, *, draft_len, policy, k, stop_ids):
        from tandem.speculation.plan import DEFAULT_DRAFT_LEN, SPECTR_BRANCHES, SpecConfig

        spec = SpecConfig(method=method, draft_len=draft_len or DEFAULT_DRAFT_LEN[method], policy=policy, k=k or SPECTR_BRANCHES)
        return self.engine.generate("target", ids, spec=spec, sampling=sp, max_new_tokens=max_new, stop_ids=stop_ids)

    def describe(self, method: str) -> dict:
        return {"thread_split": {"target": self.target_threads, "draft": self.draft_threads}}

    def close(self) -> None:
        self.engine.shutdown()


def _quant(args) -> str | None:
    from tandem.deploy.pack_grid import draft_quantize

    return draft_quantize(args.draft, args.draft_quantize)


def in_flight(generate: Callable[[list[int]], Sequence[int]], *, prompts_ids, concurrency: int) -> dict:
    """C requests in flight (prompts cycled to at least 2C requests), `generate(ids) -> tokens`
    each: aggregate tokens/s."""
    from concurrent.futures import ThreadPoolExecutor

    n = max(len(prompts_ids), 2 * concurrency)
    work = [prompts_ids[i % len(prompts_ids)] for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(len(out) for out in pool.map(generate, work))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n, "aggregate_tokens_per_s": round(tokens / wall, 3)}


def run_concurrent(name, *, backend, prompts_ids, concurrency: int, max_new_tokens, sampling, call_kwargs) -> dict:
    """tandem's method `name` with C requests in flight (in_flight)."""
    return in_flight(lambda ids: backend.generate(ids, name, max_new_tokens, sampling, **call_kwargs).tokens,
                     prompts_ids=prompts_ids, concurrency=concurrency)


def main(args) -> int:
    """Run the benchmark described by parsed CLI `args` (see deploy/cli.py)."""
    from tqdm import tqdm

    from tandem.actors.devices import available_threads
    from tandem.actors.loading import parse_dtype
    from tandem.deploy.models import encode_prompt, load_causal_lm, sorted_thresholds, stop_ids_for, tokenizer_for
    from tandem.deploy.packs import resolve_model_path
    from tandem.speculation.sorted_policy import ExitPolicy

    methods = parse_methods(args.methods)
    via = getattr(args, "via", "local")
    threads = args.threads or available_threads()
    torch.set_num_threads(threads)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    prompts = load_prompts(args.prompts, args.limit)
    tokenizer = tokenizer_for(args.target)
    target_path = resolve_model_path(args.target)
    eos_ids = stop_ids_for(tokenizer, target_path)
    prompts_ids = [encode_prompt(tokenizer, messages=p["messages"]) for p in prompts]
    dtype = args.dtype
    exits = tuple(int(e) for e in args.exits.split(",")) if args.exits else ()
    sd_exit = getattr(args, "sd_exit", None)
    if sd_exit is not None:  # the draft runner refuses a depth it does not have
        exits = tuple(sorted(set(exits) | {sd_exit}))

    eprint(f"[bench] loading {args.target} and {args.draft} ({dtype}, {threads} threads, via {via})")
    hf_target = load_causal_lm(target_path, parse_dtype(dtype)).eval()
    hf_draft = load_causal_lm(resolve_model_path(args.draft), parse_dtype(dtype)).eval() if "hf-assisted" in methods else None
    backend = None
    if any(m in TANDEM_METHODS for m in methods):
        if via == "actors":
            backend = ActorBackend(args=args, dtype=dtype, exits=exits)
        else:
            backend = LocalBackend(args=args, hf_target=hf_target, dtype=dtype, threads=threads, exits=exits)
    policy = None
    if "sorted" in methods:
        draft_exits = backend.draft_exits
        if len(draft_exits) < 2:
            # no trained or configured exit below the full depth: sorted drafting over one exit is sd
            eprint("[bench] sorted: the draft has no exit below its full depth (no trained exits: see "
                   "`tandem train-exits`, or pass --exits); it runs as sd with the full draft")
            policy = ExitPolicy.single(draft_exits[-1])
        else:
            policy = ExitPolicy(exits=tuple(draft_exits), thresholds=sorted_thresholds(args, tuple(draft_exits)))

    sd_policy = ExitPolicy.single(sd_exit) if sd_exit is not None else None

    def call_kwargs(method):
        pol = policy if method == "sorted" else sd_policy if method in ("sd", "pearl") else None
        return {"draft_len": args.draft_len, "policy": pol, "k": args.k, "stop_ids": eos_ids}

    total = len(methods) * len(prompts_ids)
    bar = tqdm(total=total, desc="bench", unit="prompt", file=sys.stderr, dynamic_ncols=True)

    def progress(name):
        bar.set_postfix_str(name)
        bar.update(1)

    runs: list[MethodRun] = []
    try:
        for method in methods:
            if method.startswith("llamacpp-"):
                from tandem.bench.llama_peer import llamacpp_binary

                run = run_llama(
                    method, binary=llamacpp_binary(getattr(args, "llamacpp_bin", None)), pack=args.target,
                    draft=args.draft, prompts_ids=prompts_ids,
                    max_new_tokens=args.max_new_tokens, sampling=sampling, threads=threads, progress=progress,
                    concurrency=args.concurrency,
                )
            elif method in BASELINES:
                run = run_baseline(
                    method,
                    hf_target=hf_target,
                    hf_draft=hf_draft,
                    prompts_ids=prompts_ids,
                    max_new_tokens=args.max_new_tokens,
                    sampling=sampling,
                    eos_ids=eos_ids,
                    threads=threads,
                    progress=progress,
                )
            else:
                kw = call_kwargs(method)
                if hasattr(backend, "forget_prompts"):  # in this process; an actor's target keeps its own
                    backend.forget_prompts()
                run = run_tandem(
                    method,
                    generate=lambda ids, m, n, sp, kw=kw: backend.generate(ids, m, n, sp, **kw),
                    prompts_ids=prompts_ids,
                    max_new_tokens=args.max_new_tokens,
                    sampling=sampling,
                    progress=progress,
                )
                run.extra.update(backend.describe(method))
                if method == "sorted" and len(policy.exits) < 2:
                    run.extra["fallback"] = "sd: no exit below the draft's full depth"
                if args.concurrency > 1:
                    run.extra["concurrent"] = run_concurrent(
                        method, backend=backend, prompts_ids=prompts_ids, concurrency=args.concurrency,
                        max_new_tokens=args.max_new_tokens, sampling=sampling, call_kwargs=kw,
                    )
            if "concurrent" in run.extra:  # tandem's methods and llama.cpp's, measured alike (in_flight)
                conc = run.extra["concurrent"]
                conc["gain_vs_one_at_a_time"] = round(conc["aggregate_tokens_per_s"] / max(run.tokens_per_s, 1e-9), 3)
            runs.append(run)
    finally:
        bar.close()
        if backend is not None:
            backend.close()
    torch.set_num_threads(threads)
    from tandem.deploy.pack_grid import target_quantize

    served_target = getattr(backend, "target_runner", None)
    if target_quantize(args.target, args.target_quantize) == "pack" and any(r.method == "ar" for r in runs):
        # the served target is not the bf16 model hf-ar runs: greedy output is compared with
        # its own autoregressive output (margins from its logits in-process, else the bf16 model's)
        last = runner_last_logits(served_target) if served_target is not None else hf_last_logits(hf_target)
        results = summarize(runs, last_logits=last, prompts_ids=prompts_ids, sampling=sampling, reference="ar")
    else:
        results = summarize(runs, last_logits=hf_last_logits(hf_target), prompts_ids=prompts_ids, sampling=sampling)
    payload = {
        "results": results,
        "machine": machine_info(threads),
        "config": {
            "prompts": str(args.prompts),
            "limit": args.limit,
            "max_new_tokens": args.max_new_tokens,
            "target": args.target,
            "draft": args.draft,
            "draft_quantize": args.draft_quantize,
            "target_quantize": args.target_quantize,
            "target_kernel": getattr(served_target, "kernel", None),  # "pack-ggml", "pack", "dense" (in-process runs)
            "greedy_reference": "ar" if target_quantize(args.target, args.target_quantize) == "pack" else "hf-ar",
            "dtype": dtype,
            "temperature": args.temperature,
            "via": via,
            "concurrency": args.concurrency,
            "shards": getattr(args, "shards", 1),
            "exits": list(backend.draft_exits) if backend is not None else [],
            "thresholds": list(policy.thresholds) if policy else [],
            "draft_len": args.draft_len,
            "sd_exit": sd_exit,
        },
    }
    print(format_table(results))
    if args.output:
        write_json(args.output, payload)
        eprint(f"[bench] wrote {args.output}")
    return 0
