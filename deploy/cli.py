"""The `tandem` command line. Long functions live here, at the edge, and nowhere else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from deploy.packs import DEFAULT_DRAFT, DEFAULT_TARGET

METHOD_CHOICES = ["ar", "sd", "sorted", "pearl", "spectr"]


def _add_sampling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None)


def _add_models(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", default=DEFAULT_TARGET, help="pack name, local folder or hub id")
    g.add_argument("--draft", default=DEFAULT_DRAFT, help="pack name, local folder or hub id")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--draft-quantize", default="int4", choices=["none", "int8", "int4"], help="weight-only draft quantization")
    g.add_argument("--exits", default="", help="draft exit depths for 'sorted', e.g. 12,24")
    g.add_argument("--thresholds", default="", help="confidence thresholds per exit below the last, e.g. 0.8")
    g.add_argument("--threads", type=int, default=0, help="torch threads in all (default: every core)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Lossless multi-target speculative decoding")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text (in-process with --local)")
    gen.add_argument("--local", action="store_true", help="run the models in this process")
    gen.add_argument("--prompt", help="user message (the chat template is applied)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--method", default="sd", choices=METHOD_CHOICES)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--gamma", type=int, default=None, help="draft tokens per round (default per method)")
    gen.add_argument("--k", type=int, default=2, help="SpecTr branches")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    _add_models(gen)
    _add_sampling(gen)

    bench = sub.add_parser("bench", help="benchmark methods against transformers baselines")
    bench.add_argument("--prompts", required=True, help="JSONL prompts (Spec-Bench format or prompt/messages)")
    bench.add_argument("--limit", type=int, default=3)
    bench.add_argument("--max-new-tokens", type=int, default=96)
    bench.add_argument("--methods", default="hf-ar,hf-assisted,ar,sd,sorted,pearl,spectr")
    bench.add_argument("--json", default=None, help="write results here")
    bench.add_argument("--gamma", type=int, default=None)
    bench.add_argument("--k", type=int, default=2)
    bench.add_argument("--via", default="local", choices=["local", "actors"], help="run tandem's methods in-process or on Ray actors")
    bench.add_argument("--concurrency", type=int, default=1, help="also measure aggregate tokens/s with C requests in flight")
    bench.add_argument("--draft-threads", type=int, default=1, help="--via actors: torch threads of the draft actor")
    bench.add_argument("--target-threads", type=int, default=1, help="--via actors: torch threads of each target actor")
    bench.add_argument("--shards", type=int, default=1, help="--via actors: pipeline stages of the target")
    bench.add_argument("--address", default=None, help="--via actors: join this Ray cluster instead of an embedded one")
    _add_models(bench)
    _add_sampling(bench)

    models = sub.add_parser("models", help="list a server's targets (--server) or the local model packs")
    models.add_argument("--server", default=None, help="host:port of a running tandem server")
    models.add_argument("--token", default=None, help="bearer token (default: $TANDEM_AUTH_TOKEN)")

    serve = sub.add_parser("serve", help="serve the gRPC API (embedded local Ray and the default packs by default)")
    serve.add_argument("--config", default=None, help="YAML config (see deploy/config.py); default: embedded defaults")
    serve.add_argument("--address", default=None, help='join a Ray cluster ("auto", "ray://host:10001") instead of starting one')
    serve.add_argument("--host", default=None, help="bind address (overrides server.host)")
    serve.add_argument("--port", type=int, default=None, help="gRPC port (overrides server.port)")
    serve.add_argument("--log-level", default="INFO")
    return parser


def _policy_from_args(args, draft_runner):
    from speculation.sorted_policy import ExitPolicy

    if args.method != "sorted":
        return None
    exits = draft_runner.exits
    if len(exits) < 2:
        raise ValueError("exits: method 'sorted' needs --exits with at least one exit below the full depth")
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else [0.8] * (len(exits) - 1)
    return ExitPolicy(exits=exits, thresholds=tuple(thresholds))


def cmd_generate(args) -> int:
    if not args.local:
        raise ValueError("generate: give --local (the gRPC client path needs a running server)")
    if not args.prompt:
        raise ValueError("prompt: give --prompt TEXT")
    from actors.local import LocalEngine
    from deploy.models import ModelSpec, build_runner, encode_prompt, stop_ids_for, tokenizer_for
    from deploy.packs import resolve_model_path
    from speculation.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    tokenizer = tokenizer_for(args.target)
    prompt_ids = encode_prompt(tokenizer, prompt=args.prompt, chat=not args.raw)
    target = build_runner(ModelSpec(ref=args.target, dtype=args.dtype))
    draft = None
    if args.method != "ar":
        exits = tuple(int(e) for e in args.exits.split(",")) if args.exits else ()
        quant = None if args.draft_quantize == "none" else args.draft_quantize
        draft = build_runner(ModelSpec(ref=args.draft, dtype=args.dtype, quantize=quant, exits=exits))
    policy = _policy_from_args(args, draft) if draft is not None else None
    stop_ids = stop_ids_for(tokenizer, resolve_model_path(args.target))
    streamer = TextStreamer(tokenizer, enabled=not args.json)
    with LocalEngine(target, draft, threads=args.threads or None) as engine:
        result = engine.generate(
            prompt_ids,
            method=args.method,
            sampling=sampling,
            max_new_tokens=args.max_new_tokens,
            gamma=args.gamma,
            policy=policy,
            k=args.k,
            stop_ids=stop_ids,
            on_tokens=streamer.push,
        )
    text = tokenizer.decode(result.tokens, skip_special_tokens=True)
    summary = {
        "method": args.method,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.tokens),
        "tokens_per_s": round(result.tokens_per_s, 2),
        "ttft_s": round(result.prefill_s, 3),
        "stats": result.stats.to_dict(),
    }
    if args.json:
        print(json.dumps({"text": text, **summary}))
    else:
        streamer.finish()
        s = result.stats
        print(
            f"\n--- {args.method}: {len(result.tokens)} tokens in {result.total_s:.2f}s "
            f"({result.tokens_per_s:.2f} tok/s, first token {result.prefill_s:.2f}s), finish: {result.finish_reason}",
            file=sys.stderr,
        )
        if s.rounds:
            accs = ", ".join(f"{a:.2f}" for a in s.acceptance_by_position())
            print(
                f"    rounds {s.rounds}, drafted {s.drafted}, accepted {s.accepted}, "
                f"mean accepted length {s.mean_accepted_len:.2f}, acceptance by position [{accs}], "
                f"exits {dict(sorted(s.exits_used.items()))}",
                file=sys.stderr,
            )
    return 0


class TextStreamer:
    """Prints generated text as tokens arrive, decoding the whole output each time so that
    multi-byte characters split across tokens print whole."""

    def __init__(self, tokenizer, *, enabled: bool):
        self.tokenizer = tokenizer
        self.enabled = enabled
        self.tokens: list[int] = []
        self.printed = 0

    def push(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        if not self.enabled:
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)

    def finish(self) -> None:
        if self.enabled:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            sys.stdout.write(text[self.printed :] + "\n")
            sys.stdout.flush()


def cmd_models(args) -> int:
    from deploy.packs import pack_status

    for name, status in pack_status().items():
        print(f"{name:32s} {status}")
    return 0


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from deploy.config import load_config
    from deploy.serve import serve_forever

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config)
    overrides: dict = {}
    if args.address is not None:
        overrides["ray"] = cfg.ray.model_copy(update={"address": args.address})
    server_upd = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if server_upd:
        overrides["server"] = cfg.server.model_copy(update=server_upd)
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    return asyncio.run(serve_forever(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "bench":
            from bench.bench import main as bench_main

            return bench_main(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "serve":
            return cmd_serve(args)
    except (ValueError, KeyError) as exc:
        from deploy.packs import PackNotInstalledError

        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # PackNotInstalledError and friends
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tandem {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
