"""The `tandem` command line. Long functions live here, at the edge, and nowhere else (which
is why the module runs past ~400 lines: one argument parser and one handler per subcommand)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from tandem.deploy.packs import DEFAULT_DRAFT, DEFAULT_TARGET, DRAFT_QUANTIZE_DEFAULT, QUANTIZE_SETTINGS

from tandem.speculation.plan import METHODS


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
    g.add_argument(
        "--draft-quantize", default=DRAFT_QUANTIZE_DEFAULT, choices=QUANTIZE_SETTINGS,
        help="draft weights: pack = a model pack at 4 bits from its own GGUF grid; auto = pack for packs, int4 otherwise (default)",
    )
    g.add_argument(
        "--target-quantize", default="auto", choices=QUANTIZE_SETTINGS,
        help="target weights: pack = a model pack at 4 bits from its own GGUF grid; auto = pack for packs (default)",
    )
    g.add_argument(
        "--device", default="auto",
        help='where tandem\'s runners run: auto (a GPU when one is visible, else the CPU), cpu, cuda or cuda:N',
    )
    g.add_argument("--exits", default="", help="draft exit depths for 'sorted', e.g. 12,24")
    g.add_argument("--thresholds", default="", help="confidence thresholds per exit below the last, e.g. 0.8")
    g.add_argument(
        "--exit-adapters", default="auto",
        help='trained exits: a `tandem train-exits` folder, "auto" (its default folder when present) or "none"',
    )
    g.add_argument("--threads", type=int, default=0, help="torch threads in all (default: every core)")


def version_string() -> str:
    """`tandem --version`: tandem's version and the versions it runs with (read from package
    metadata, so nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    return f"tandem {v('tandem')} (ray {v('ray')}, torch {v('torch')}, grpcio {v('grpcio')}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Lossless multi-target speculative decoding")
    parser.add_argument("--version", action="version", version=version_string())
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a server (--server) or in-process (--local)")
    gen.add_argument("--local", action="store_true", help="run the models in this process")
    gen.add_argument("--server", default="127.0.0.1:50051", help="host:port of a running tandem server")
    gen.add_argument("--token", default=None, help="bearer token (default: $TANDEM_AUTH_TOKEN)")
    gen.add_argument("--tls", action="store_true", help="connect with TLS (system roots or --ca)")
    gen.add_argument("--ca", default=None, help="PEM root certificates for --tls")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--prompt", help="user message (the chat template is applied)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument(
        "--method", default=None, choices=list(METHODS), help="default: auto (the target's goodput policy: on a server, the router's; with --local, the engine's own)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--draft-len", type=int, default=None,
                     help="draft tokens per round of an explicit method (default: planned per target; a server takes it as the request's max_draft_len)")
    gen.add_argument("--k", type=int, default=None, help="SpecTr branches (default: the planner's, 2)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    _add_models(gen)
    _add_sampling(gen)
    shaping = gen.add_argument_group("penalties and logprobs (they change the target distribution; every method stays lossless)")
    shaping.add_argument("--min-p", type=float, default=None, help="drop tokens below MIN_P times the top token's probability")
    shaping.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 = off (prompt and output tokens)")
    shaping.add_argument("--frequency-penalty", type=float, default=None, help="in [-2, 2]; 0 = off (output tokens)")
    shaping.add_argument("--presence-penalty", type=float, default=None, help="in [-2, 2]; 0 = off (output tokens)")
    shaping.add_argument("--logprobs", type=int, default=None, help="with --json: each token's logprob and N alternatives")

    bench = sub.add_parser("bench", help="benchmark methods against transformers baselines")
    bench.add_argument("--prompts", required=True, help="JSONL prompts (Spec-Bench format or prompt/messages)")
    bench.add_argument("--limit", type=int, default=3)
    bench.add_argument("--max-new-tokens", type=int, default=96)
    bench.add_argument("--methods", default="hf-ar,hf-assisted,ar,sd,sorted,pearl,spectr")
    bench.add_argument("--output", default=None, help="write the results here (JSON)")
    bench.add_argument("--draft-len", type=int, default=None)
    bench.add_argument("--k", type=int, default=None, help="SpecTr branches (default: the planner's, 2)")
    bench.add_argument("--sd-exit", type=int, default=None,
                       help="draft depth for 'sd' (and pearl): a trained exit such as 16 (default: the full draft)")
    bench.add_argument(
        "--via", default="local", choices=["local", "actors", "grpc"],
        help="run tandem's methods in-process, on Ray actors, or through a running server (--server)",
    )
    bench.add_argument("--server", default="127.0.0.1:50051", help="--via grpc: host:port of the server")
    bench.add_argument("--token", default=None, help="--via grpc: bearer token (default: $TANDEM_AUTH_TOKEN)")
    bench.add_argument("--targets", default="", help="--via grpc: comma-separated targets (default: all)")
    bench.add_argument("--method", default="auto", help="--via grpc: speculation method to compare with off")
    bench.add_argument("--warmup", type=int, default=6, help="--via grpc: warm-up requests per target")
    bench.add_argument("--concurrency", type=int, default=1, help="also measure aggregate tokens/s with C requests in flight")
    bench.add_argument(
        "--llamacpp", action="store_true",
        help="--via grpc: also run llama.cpp's llama-server on each target's pack GGUF, same prompts, same "
        "concurrency, in the same run (bench/grpc_bench.py)",
    )
    bench.add_argument(
        "--llamacpp-bin", default=None,
        help="llama.cpp's llama-server for the llamacpp-ar/llamacpp-spec peers (default: $TANDEM_LLAMACPP_BIN, "
        "PATH, or `make peer`'s build; bench/llama_peer.py)",
    )
    bench.add_argument("--draft-threads", type=int, default=1, help="--via actors: torch threads of the draft actor")
    bench.add_argument("--target-threads", type=int, default=1, help="--via actors: torch threads of each target actor")
    bench.add_argument("--shards", type=int, default=1, help="--via actors: pipeline stages of the target")
    bench.add_argument("--address", default=None, help="--via actors: join this Ray cluster instead of an embedded one")
    _add_models(bench)
    _add_sampling(bench)

    models = sub.add_parser("models", help="list a server's targets (--server) or the local model packs")
    models.add_argument("--server", default=None, help="host:port of a running tandem server")
    models.add_argument("--token", default=None, help="bearer token (default: $TANDEM_AUTH_TOKEN)")

    batch = sub.add_parser("batch", help="offline generation over a JSONL file with Ray Data (resumable)")
    batch.add_argument("--input", required=True, help="JSONL: prompt | messages | Spec-Bench turns, optional target, sampling")
    batch.add_argument("--output", required=True, help="JSONL, one record per input record; re-runs skip what is there")
    batch.add_argument("--config", default=None, help="YAML config (targets, draft, batch.min_actors/max_actors)")
    batch.add_argument("--address", default=None, help="join a Ray cluster instead of starting an embedded one")
    batch.add_argument("--min-actors", type=int, default=None)
    batch.add_argument("--max-actors", type=int, default=None)
    batch.add_argument("--threads-per-actor", type=int, default=None, help="torch threads per actor (default: CPUs / max actors)")
    batch.add_argument("--max-new-tokens", type=int, default=256, help="default for records without sampling.max_new_tokens")
    batch.add_argument("--method", default=None, help="default speculation method for records without one")
    batch.add_argument("--limit", type=int, default=None, help="generate at most this many pending records")
    batch.add_argument("--engine", default=None,
                       help="local: in-process engines per Ray Data actor (default); pools: the server's pools and router")

    sub.add_parser("train-exits", help="train the draft's early exits (run `tandem train-exits --help`)", add_help=False)
    sub.add_parser("exit-report", help="acceptance and draft cost per exit and target (run `tandem exit-report --help`)", add_help=False)

    serve = sub.add_parser("serve", help="serve the gRPC API (embedded local Ray and the default packs by default)")
    serve.add_argument("--config", default=None, help="YAML config (see deploy/config.py); default: embedded defaults")
    serve.add_argument("--address", default=None, help='join a Ray cluster ("auto", "ray://host:10001") instead of starting one')
    serve.add_argument("--host", default=None, help="bind address (overrides server.host)")
    serve.add_argument("--port", type=int, default=None, help="gRPC port (overrides server.port)")
    serve.add_argument("--log-level", default="INFO")

    down = sub.add_parser("pools-down", help="end the shared pools (ray.shared_pools) a Ray cluster runs")
    down.add_argument("--config", default=None, help="YAML config (its ray.namespace and ray.address)")
    down.add_argument("--address", default=None, help='the Ray cluster ("auto", "ray://host:10001"; default: RAY_ADDRESS)')
    return parser


def _policy_from_args(args, draft_runner):
    from tandem.speculation.sorted_policy import ExitPolicy

    if args.method != "sorted":
        return None
    exits = draft_runner.exits
    if len(exits) < 2:
        print("tandem generate: method 'sorted': the draft has no exit below its full depth (no trained exits: "
              "see `tandem train-exits`, or pass --exits); running sd instead", file=sys.stderr)
        args.method = "sd"
        return None
    from tandem.deploy.models import sorted_thresholds

    return ExitPolicy(exits=exits, thresholds=sorted_thresholds(args, exits))


def _shaping_args(args) -> dict:
    """`tandem generate`'s min-p, penalty and logprobs flags (None: not given)."""
    return {
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "frequency_penalty": args.frequency_penalty,
        "presence_penalty": args.presence_penalty,
        "logprobs": args.logprobs,
    }


def cmd_generate(args) -> int:
    if not args.prompt:
        raise ValueError("prompt: give --prompt TEXT")
    if not args.local:
        return cmd_generate_remote(args)
    args.method = args.method or "auto"
    from tandem.actors.local import LocalEngine
    from tandem.deploy.local import LocalServer
    from tandem.deploy.models import ModelSpec, build_runner, stop_ids_for, tokenizer_for
    from tandem.deploy.pack_grid import draft_quantize, target_quantize
    from tandem.deploy.packs import resolve_model_path

    tokenizer = tokenizer_for(args.target)
    target = build_runner(ModelSpec(ref=args.target, dtype=args.dtype, device=args.device, quantize=target_quantize(args.target, args.target_quantize)))
    draft = None
    if args.method != "off":
        exits = tuple(int(e) for e in args.exits.split(",")) if args.exits else ()
        quant = draft_quantize(args.draft, args.draft_quantize)
        draft = build_runner(
            ModelSpec(ref=args.draft, dtype=args.dtype, device=args.device, quantize=quant, exits=exits, exit_adapters=args.exit_adapters)
        )
    policy = _policy_from_args(args, draft) if draft is not None else None
    streamer = TextStreamer(tokenizer, enabled=not args.json)
    engine = LocalEngine(target, draft, threads=args.threads or None)
    server = LocalServer(name=args.target, engine=engine, tokenizer=tokenizer, eos_ids=stop_ids_for(tokenizer, resolve_model_path(args.target)),
                         sorted_policy=policy, draft_len=args.draft_len, default_max_new_tokens=args.max_new_tokens)
    try:
        # the same request a server gets, validated and planned the same way
        out = server.generate(
            on_delta=lambda d: streamer.push(d.token_ids),
            target=args.target, prompt=args.prompt, raw_prompt=args.raw, method=args.method, **_sampling_kwargs(args),
        )
    finally:
        server.close()
    stats = out.stats or {}
    ran = stats.get("method", args.method)
    summary = {
        "method": ran,
        "draft_len": stats.get("draft_len", 0),
        "finish_reason": out.finish_reason,
        "prompt_tokens": (out.usage or {}).get("prompt_tokens"),
        "completion_tokens": len(out.token_ids),
        "tokens_per_s": round(len(out.token_ids) / out.total_s, 2) if out.total_s > 0 else 0.0,
        "ttft_s": round(out.ttft_s, 3),
        "stats": stats,
    }
    if out.seed is not None:
        summary["seed"] = out.seed
    if args.json:
        if args.logprobs is not None:
            summary["logprobs"] = [
                {"token_id": t, "logprob": lp.logprob, "top": [list(x) for x in lp.top]} for t, lp in zip(out.token_ids, out.logprobs)
            ]
        print(json.dumps({"text": out.text, **summary}))
    else:
        streamer.finish()
        print(
            f"\n--- {ran}{f' (asked {args.method})' if ran != args.method else ''}: {len(out.token_ids)} tokens in {out.total_s:.2f}s "
            f"({summary['tokens_per_s']:.2f} tok/s, first token {out.ttft_s:.2f}s), finish: {out.finish_reason}",
            file=sys.stderr,
        )
        if stats.get("rounds"):
            accs = ", ".join(f"{a:.2f}" for a in stats["acceptance_by_position"])
            print(
                f"    rounds {stats['rounds']}, drafted {stats['drafted']}, accepted {stats['accepted']}, "
                f"mean accepted length {stats['mean_accepted_len']:.2f}, acceptance by position [{accs}], "
                f"exits {dict(sorted(stats['exits_used'].items()))}",
                file=sys.stderr,
            )
    return 0


def _sampling_kwargs(args) -> dict:
    """`tandem generate`'s sampling flags as build_generate_request keywords (the one request
    signature, services/wire.py), for --local and for a server alike."""
    kw = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k or None,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "stop": list(args.stop) or None,
        "ignore_eos": bool(args.ignore_eos),
        **_shaping_args(args),
    }
    return {k: v for k, v in kw.items() if v is not None}


def _client(args):
    from tandem.services.client import TandemClient

    token = args.token or os.environ.get("TANDEM_AUTH_TOKEN")
    ca = open(args.ca, "rb").read() if getattr(args, "ca", None) else None
    return TandemClient(args.server, token=token, tls=getattr(args, "tls", False) or ca is not None, root_certificates=ca)


def cmd_generate_remote(args) -> int:
    from tandem.services.client import TandemError

    kwargs = dict(
        target=args.target, prompt=args.prompt, raw_prompt=args.raw, method=args.method or "auto", max_draft_len=args.draft_len,
        **_sampling_kwargs(args),
    )
    try:
        with _client(args) as client:
            if args.json:
                r = client.generate(**kwargs)
                out = {"text": r.text, "finish_reason": r.finish_reason, "usage": r.usage, "stats": r.stats, "request_id": r.request_id}
                if r.seed is not None:
                    out["seed"] = r.seed
                if args.logprobs is not None:
                    out["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(x) for x in lp.top]} for lp in r.logprobs]
                print(json.dumps(out))
                return 0
            last = None
            import time as _time

            t0 = _time.perf_counter()
            first = None
            for chunk in client.generate_stream(**kwargs):
                if first is None and chunk.token_ids:
                    first = _time.perf_counter() - t0
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
            elapsed = _time.perf_counter() - t0
    except TandemError as exc:
        print(f"\ntandem generate: {exc}", file=sys.stderr)
        return 1
    print()
    if last is not None and last.usage:
        n = last.usage["completion_tokens"]
        s = last.stats or {}
        print(
            f"--- {args.target}: {n} tokens in {elapsed:.2f}s ({n / elapsed if elapsed else 0:.2f} tok/s, "
            f"first token {first or 0:.2f}s), finish: {last.finish_reason}",
            file=sys.stderr,
        )
        if s:
            accs = ", ".join(f"{a:.2f}" for a in s.get("acceptance_by_position", []))
            print(
                f"    method {s.get('method')}, draft length {s.get('draft_len')}, rounds {s.get('rounds')}, "
                f"drafted {s.get('drafted')}, accepted {s.get('accepted')}, mean accepted length "
                f"{s.get('mean_accepted_len', 0):.2f}, acceptance by position [{accs}], exits {s.get('exits_used')}",
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
    if args.server:
        from tandem.services.client import TandemError

        try:
            with _client(args) as client:
                info = client.list_models()
        except TandemError as exc:
            print(f"tandem models: {exc}", file=sys.stderr)
            return 1
        for t in info["targets"]:
            print(f"target {t['name']:32s} {t['model']} x{t['replicas']} {t['dtype']} context {t['max_context']}")
        if info.get("draft"):
            d = info["draft"]
            print(f"draft  {d['model']} x{d['replicas']} {d['dtype']} exits {d['exits']}")
        return 0
    from tandem.deploy.packs import pack_status

    for name, status in pack_status().items():
        print(f"{name:32s} {status}")
    return 0


def _flag_overrides(**sections: dict) -> dict:
    """The flags a user gave, as a nested mapping over the config (unset flags are None)."""
    out = {name: {k: v for k, v in fields.items() if v is not None} for name, fields in sections.items()}
    return {name: fields for name, fields in out.items() if fields}


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from tandem.deploy.config import load_config
    from tandem.deploy.serve import serve_forever

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, overrides=_flag_overrides(
        ray={"address": args.address}, server={"host": args.host, "port": args.port}))
    return asyncio.run(serve_forever(cfg))


def cmd_pools_down(args) -> int:
    from tandem.actors.directory import pools_down
    from tandem.actors.remote import ensure_ray, join_address
    from tandem.deploy.config import load_config

    cfg = load_config(args.config, overrides=_flag_overrides(ray={"address": args.address}))
    if not join_address(cfg.ray.address):
        raise ValueError("address: name the Ray cluster whose shared pools to end (--address or RAY_ADDRESS)")
    ensure_ray(address=cfg.ray.address, namespace=cfg.ray.namespace)
    ended = pools_down()
    print(json.dumps({"namespace": cfg.ray.namespace, "ended": ended}))
    return 0


def cmd_batch(args) -> int:
    from tandem.deploy.batch import run_batch
    from tandem.deploy.config import load_config
    from tandem.deploy.packs import resolve_model_path

    cfg = load_config(args.config, overrides=_flag_overrides(
        ray={"address": args.address},
        batch={"method": args.method, "min_actors": args.min_actors, "max_actors": args.max_actors, "engine": args.engine}))
    summary = run_batch(
        cfg,
        input_path=args.input,
        output_path=args.output,
        min_actors=cfg.batch.min_actors,
        max_actors=cfg.batch.max_actors,
        threads_per_actor=args.threads_per_actor,
        default_max_new_tokens=args.max_new_tokens,
        resolve=resolve_model_path,
        limit=args.limit,
        engine=cfg.batch.engine,
    )
    print(json.dumps(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train-exits", "exit-report"):
        # these own their flags (training/train_exits.py, training/exit_report.py)
        if argv[0] == "train-exits":
            from tandem.training.train_exits import main as sub_main
        else:
            from tandem.training.exit_report import main as sub_main
        return sub_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "bench":
            if args.concurrency < 1:
                raise ValueError(f"--concurrency: requests in flight, >= 1; got {args.concurrency}")
            if args.llamacpp and args.via != "grpc":
                raise ValueError("--llamacpp: for --via grpc; in-process and actor runs name the peer in --methods "
                                 "(llamacpp-ar, llamacpp-spec)")
            if args.via == "grpc":
                from tandem.bench.grpc_bench import main as grpc_bench_main

                return grpc_bench_main(args)
            from tandem.bench.bench import main as bench_main

            return bench_main(args)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "batch":
            return cmd_batch(args)
        if args.command == "pools-down":
            return cmd_pools_down(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "tandem").split(".")[0] == "tandem":
            raise  # a bug of ours, not a missing extra
        # `pip install tandem` is the client alone: `generate --server` and `models --server`
        # work; serving, batch, bench and local generation need the server extra.
        print(
            f"tandem {args.command}: error: this needs tandem's server dependencies (missing module "
            f"{exc.name!r}); install them with: pip install 'tandem[server]'",
            file=sys.stderr,
        )
        return 2
    except (ValueError, KeyError) as exc:

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
