"""`tandem batch --input IN.jsonl --output OUT.jsonl`: offline generation with Ray Data on
an autoscaling actor pool, one output record per input record, resumable.

Input records (one JSON object per line), any of:
- {"prompt": "...", ...} or {"messages": [{"role": ..., "content": ...}], ...}
- Spec-Bench questions: {"question_id": ..., "category": ..., "turns": ["...", "..."]} (the
  turns are answered one after the other, each answer becoming part of the next turn's chat)
with optional "id", "target" (default: the first target of the config), "sampling"
({temperature, top_p, top_k, seed, min_p, repetition_penalty, frequency_penalty,
presence_penalty, logprobs, max_new_tokens, stop, ignore_eos}, as in the gRPC request) and
"method".

Output records: {"key", "line", "id", "target", "text" (or "turns"), "finish_reason",
"usage", "stats"}, plus "logprobs" when asked (per generated token: {"token_id", "logprob",
"top": [[token_id, logprob], ...]}, a list per turn for Spec-Bench records), or, for a record
that failed, {"key", "line", "id", "error"}.

Exactly once: every record has a key (its "id"/"question_id" when given and unique, else its
line number). A re-run reads the output, drops a torn last line, and skips every key already
written, so a crash or Ctrl-C loses nothing and repeats nothing.

Two engines (--engine, batch.engine in the config):
- "local" (default): each Ray Data pool actor hosts an in-process engine (target runner,
  int4 draft runner, threads split between them) behind the server's validation, planner
  and router (deploy/local.py), one record at a time, and asks Ray for the first target's
  placement (its pool resource, GPUs and accelerator type), so on a cluster the actors land
  on target-pool nodes; Ray Data grows the pool from --min-actors to --max-actors while
  records are waiting.
- "pools": the records go through the server's own draft and target pools, router, KV
  admission and per-target goodput policy (deploy/pooled.py), as many in flight as the
  targets run at once; the pools scale with the load as `tandem serve`'s do
  (autoscaling: max_replicas).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from typing import get_args

from tandem.deploy.config import BatchEngine, TandemConfig
from tandem.speculation.plan import METHODS

ENGINES = get_args(BatchEngine)

# the SamplingParams fields a record may set (the rest of SAMPLING_KEYS are limits and stops)
PARAM_KEYS = (
    "temperature", "top_p", "top_k", "seed", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logprobs",
)
SAMPLING_KEYS = {*PARAM_KEYS, "max_new_tokens", "stop", "ignore_eos"}


def sampling_params(sampling: dict):
    """The SamplingParams of a record's "sampling" object (unset fields: the defaults)."""
    from tandem.speculation.sampling import SamplingParams

    return SamplingParams(**{k: sampling[k] for k in PARAM_KEYS if sampling.get(k) is not None})


@dataclass(frozen=True)
class PendingRecord:
    key: str
    line: int
    payload: str  # the normalized record as JSON


def _normalize(raw: Any, *, line: int, targets: list[str]) -> dict:
    """Validate one input record; raises ValueError naming the field."""
    if not isinstance(raw, dict):
        raise ValueError("record must be a JSON object")
    rec: dict = {"line": line}
    rid = raw.get("id", raw.get("question_id"))
    if rid is not None:
        rec["id"] = str(rid)
    if "turns" in raw:
        turns = raw["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError("turns must be a non-empty list of non-empty strings")
        rec["turns"] = turns
    elif "messages" in raw:
        msgs = raw["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("messages must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{role: system|user|assistant, content: str}}")
        rec["messages"] = msgs
    elif "prompt" in raw:
        if not isinstance(raw["prompt"], str) or not raw["prompt"].strip():
            raise ValueError("prompt must be a non-empty string")
        rec["prompt"] = raw["prompt"]
    else:
        raise ValueError("record needs prompt, messages or turns")
    target = raw.get("target", targets[0])
    if target not in targets:
        raise ValueError(f"target {target!r} is not configured; targets: {', '.join(targets)}")
    rec["target"] = target
    sampling = raw.get("sampling", {})
    if not isinstance(sampling, dict):
        raise ValueError("sampling must be an object")
    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        raise ValueError(f"sampling: unknown field(s) {', '.join(sorted(unknown))}")
    from tandem.services.servicer import MAX_TOP_LOGPROBS

    logprobs = sampling.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise ValueError(f"sampling.logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
    try:
        sampling_params(sampling)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"sampling.{exc}") from None
    mnt = sampling.get("max_new_tokens")
    if mnt is not None and (isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1):
        raise ValueError(f"sampling.max_new_tokens must be a positive integer, got {mnt!r}")
    stop = sampling.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("sampling.stop must be a list of non-empty strings")
    rec["sampling"] = sampling
    method = raw.get("method", "auto")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    rec["method"] = method
    return rec


def read_done_keys(output: Path) -> set[str]:
    """Keys already written; a torn last line (a crash mid-write) is cut off first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    good = data.rfind(b"\n") + 1
    if good < len(data):
        with open(output, "r+b") as f:
            f.truncate(good)
    keys = set()
    for line in data[:good].splitlines():
        if line.strip():
            keys.add(json.loads(line)["key"])
    return keys


def scan_input(path: Path, *, targets: list[str], done: set[str]) -> tuple[list[PendingRecord], list[dict], int]:
    """(records to generate, error records to write, records already done)."""
    pending, errors, skipped = [], [], 0
    raws: list[tuple[int, Any, str | None]] = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raws.append((line_no, json.loads(line), None))
            except json.JSONDecodeError as exc:
                raws.append((line_no, None, f"not valid JSON: {exc.msg} at column {exc.colno}"))
    ids = [str(r.get("id", r.get("question_id"))) for _, r, e in raws if e is None and isinstance(r, dict) and r.get("id", r.get("question_id")) is not None]
    duplicated = {i for i in ids if ids.count(i) > 1}
    for line_no, raw, err in raws:
        rid = raw.get("id", raw.get("question_id")) if isinstance(raw, dict) else None
        key = f"id:{rid}" if rid is not None and str(rid) not in duplicated else f"line:{line_no}"
        if key in done:
            skipped += 1
            continue
        if err is None:
            try:
                rec = _normalize(raw, line=line_no, targets=targets)
                pending.append(PendingRecord(key=key, line=line_no, payload=json.dumps(rec)))
                continue
            except ValueError as exc:
                err = str(exc)
        out = {"key": key, "line": line_no, "error": err}
        if rid is not None:
            out["id"] = str(rid)
        errors.append(out)
    return pending, errors, skipped


def generate_record(server, rec: dict, default_method: str) -> dict:
    """One normalized record through `server` (a LocalServer or PooledServer): its output
    fields. Spec-Bench turns run one after the other, each answer joining the chat."""
    method = rec["method"]
    if method == "auto":
        method = default_method  # the job's default; "auto": the planner with the target's goodput policy
    sampling = {k: v for k, v in rec["sampling"].items() if v is not None and not (k == "stop" and not v)}
    turns = rec.get("turns")
    messages = list(rec.get("messages", [])) if "messages" in rec else None
    answers, usage, stats_all, logprobs_all = [], {"prompt_tokens": 0, "completion_tokens": 0}, [], []
    chat: list[dict] = []
    finish, ran = None, method
    for turn in turns or [None]:
        if turn is not None:
            chat.append({"role": "user", "content": turn})
            given = {"messages": chat}
        elif messages is not None:
            given = {"messages": messages}
        else:
            given = {"prompt": rec["prompt"]}
        out = server.generate(target=rec["target"], method=method, **given, **sampling)
        if out.error:
            raise RuntimeError(out.error)
        answers.append(out.text)
        chat.append({"role": "assistant", "content": out.text})
        usage["prompt_tokens"] += out.usage["prompt_tokens"]
        usage["completion_tokens"] += out.usage["completion_tokens"]
        stats_all.append(out.stats)
        ran = out.stats["method"]
        if sampling.get("logprobs") is not None:
            logprobs_all.append([
                {"token_id": int(t), "logprob": lp.logprob, "top": [[int(i), v] for i, v in lp.top]}
                for t, lp in zip(out.token_ids, out.logprobs)
            ])
        finish = finish if finish == "stop" else out.finish_reason
    out_rec = {"target": rec["target"], "finish_reason": finish, "usage": usage, "method": ran}
    if turns is not None:
        out_rec["turns"] = answers
        out_rec["stats"] = stats_all
        if sampling.get("logprobs") is not None:
            out_rec["logprobs"] = logprobs_all
    else:
        out_rec["text"] = answers[0]
        out_rec["stats"] = stats_all[0]
        if sampling.get("logprobs") is not None:
            out_rec["logprobs"] = logprobs_all[0]
    return out_rec


def record_output(server_for, key, line, payload: str, default_method: str) -> str:
    """A pending record's output line: its generation through server_for(target), or the
    error that stopped it (the record fails, the job goes on)."""
    rec = json.loads(payload)
    base = {"key": str(key), "line": int(line)}
    if "id" in rec:
        base["id"] = rec["id"]
    try:
        return json.dumps({**base, **generate_record(server_for(rec["target"]), rec, default_method)})
    except Exception as exc:  # noqa: BLE001 - the record fails, the job goes on
        return json.dumps({**base, "error": f"{type(exc).__name__}: {exc}"})


class GenerateRecords:
    """The Ray Data UDF: one per pool actor, hosting an engine per target it has seen."""

    def __init__(self, config: dict, threads: int, default_max_new_tokens: int, resolve=None):
        import torch

        from tandem.deploy.config import parse_config

        torch.set_num_threads(threads)
        self.cfg = parse_config(config)
        self.threads = threads
        self.default_max_new = default_max_new_tokens
        self.resolve = resolve
        self.engines: dict[str, Any] = {}
        self._draft = None

    def _engine(self, target: str):
        if target in self.engines:
            return self.engines[target]
        from tandem.actors.local import LocalEngine
        from tandem.actors.loading import generation_eos_ids, load_tokenizer
        from tandem.actors.runner import ModelRunner
        from tandem.actors.workers import ModelLoad
        from tandem.deploy.models import trained_exits_for

        t = next(t for t in self.cfg.targets if t.name == target)
        from tandem.deploy.pack_grid import draft_quantize, resolver_for, target_quantize

        quantize = target_quantize(t.model_ref, t.quantize) if t.shards == 1 else None
        resolve = resolver_for(self.resolve, quantize)
        path = resolve(t.model_ref) if resolve else t.model_ref
        runner = ModelRunner(path, dtype=t.dtype, device=t.device, quantize=quantize)
        if self._draft is None:
            d = self.cfg.draft_pool
            dq = draft_quantize(d.model, d.quantize)
            self._draft = ModelLoad(
                path=d.model,
                dtype=d.dtype,
                quantize=dq,
                exits=tuple(d.exits),
                exit_adapters=trained_exits_for(d.model, d.exit_adapters),
                resolve=resolver_for(self.resolve, dq),
            ).build()
        from tandem.deploy.local import LocalServer
        from tandem.deploy.models import default_thresholds
        from tandem.speculation.sorted_policy import ExitPolicy

        engine = LocalEngine(runner, self._draft, threads=self.threads)
        exits = tuple(self._draft.exits)
        sorted_policy = None
        if len(exits) >= 2:  # the draft's exits below its full depth, as the server builds them
            adapters = trained_exits_for(self.cfg.draft_pool.model, self.cfg.draft_pool.exit_adapters)
            sorted_policy = ExitPolicy(exits=exits, thresholds=tuple(t.sorted_thresholds) or default_thresholds(adapters, exits))
        # the server's request validation, planner and router, in this actor (deploy/local.py)
        self.engines[target] = LocalServer(name=target, engine=engine, tokenizer=load_tokenizer(path), eos_ids=generation_eos_ids(path),
                                           sorted_policy=sorted_policy, default_max_new_tokens=self.default_max_new)
        return self.engines[target]

    def __call__(self, batch: dict) -> dict:
        outputs = [
            record_output(self._engine, key, line, payload, self.cfg.batch.method)
            for key, line, payload in zip(batch["key"], batch["line"], batch["payload"])
        ]
        return {"output": outputs}


class OutputWriter:
    """Appends records and makes each durable before counting it done."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")
        self.written = 0

    def write(self, record_json: str) -> None:
        self.f.write(record_json.rstrip("\n") + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.written += 1

    def close(self) -> None:
        self.f.close()


def run_batch(
    cfg: TandemConfig,
    *,
    input_path: str,
    output_path: str,
    min_actors: int,
    max_actors: int,
    threads_per_actor: int | None = None,
    default_max_new_tokens: int = 256,
    resolve=None,
    progress: bool = True,
    limit: int | None = None,
    engine: str = "local",
) -> dict:
    """Generate every pending record of `input_path` into `output_path` (see the module
    docstring). engine "local": Ray Data actors, each with its own in-process engines;
    "pools": the server's actor pools and router (deploy/pooled.py), many records in flight."""
    from tqdm import tqdm

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    inp, out = Path(input_path), Path(output_path)
    if not inp.is_file():
        raise ValueError(f"input: {inp} does not exist")
    if max_actors < min_actors:
        raise ValueError(f"max_actors ({max_actors}) must be >= min_actors ({min_actors})")
    targets = [t.name for t in cfg.targets]
    done = read_done_keys(out)
    pending, errors, skipped = scan_input(inp, targets=targets, done=done)
    if limit is not None:
        pending = pending[:limit]
    writer = OutputWriter(out)
    for e in errors:
        writer.write(json.dumps(e))
    summary = {"skipped_done": skipped, "errors_in_input": len(errors), "generated": 0, "failed": 0, "tokens": 0}
    if not pending:
        writer.close()
        return summary
    if engine == "pools":
        rows, done_with = _on_pools(cfg, pending, resolve=resolve, default_max_new_tokens=default_max_new_tokens)
    else:
        rows, done_with = _on_ray_data(
            cfg, pending, min_actors=min_actors, max_actors=max_actors, threads_per_actor=threads_per_actor,
            default_max_new_tokens=default_max_new_tokens, resolve=resolve,
        ), None
    bar = tqdm(total=len(pending), desc="batch", unit="rec", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    t0 = time.time()
    try:
        for output in rows:
            rec = json.loads(output)
            writer.write(output)
            if "error" in rec:
                summary["failed"] += 1
            else:
                summary["generated"] += 1
                summary["tokens"] += rec["usage"]["completion_tokens"]
            el = max(time.time() - t0, 1e-9)
            bar.set_postfix_str(f"{(summary['generated'] + summary['failed']) / el:.2f} rec/s, {summary['tokens'] / el:.1f} tok/s")
            bar.update(1)
    finally:
        bar.close()
        writer.close()
        if done_with is not None:
            done_with()
    summary["seconds"] = round(time.time() - t0, 2)
    summary["records_per_s"] = round((summary["generated"] + summary["failed"]) / max(summary["seconds"], 1e-9), 3)
    summary["tokens_per_s"] = round(summary["tokens"] / max(summary["seconds"], 1e-9), 2)
    return summary


def _on_ray_data(cfg, pending, *, min_actors, max_actors, threads_per_actor, default_max_new_tokens, resolve) -> Iterator[str]:
    """Output lines from a Ray Data autoscaling actor pool of GenerateRecords."""
    import ray

    from tandem.actors.remote import ensure_ray

    # each actor asks for the first target's placement; its own CPUs are its torch threads
    remote_args = {k: v for k, v in cfg.targets[0].placement.to_placement().ray_options().items() if v and k != "num_cpus"}
    pool_res = remote_args.get("resources", {})
    ensure_ray(
        address=cfg.ray.address,
        num_cpus=cfg.ray.num_cpus or os.cpu_count(),
        resources={k: v * max_actors for k, v in pool_res.items()},
        namespace=cfg.ray.namespace,
    )
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = threads_per_actor or max(1, cpus // max_actors)
    ds = ray.data.from_items([{"key": p.key, "line": p.line, "payload": p.payload} for p in pending])
    ds = ds.map_batches(
        GenerateRecords,
        fn_constructor_kwargs={
            "config": json.loads(cfg.model_dump_json()),
            "threads": threads,
            "default_max_new_tokens": default_max_new_tokens,
            "resolve": resolve,
        },
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_cpus=threads,
        **remote_args,
    )
    for row in ds.iter_rows():
        yield row["output"]


def _on_pools(cfg, pending, *, resolve, default_max_new_tokens):
    """Output lines, as records finish, from the server's pools and router (deploy/pooled.py),
    with as many records in flight as the targets run at once; and the call that shuts them."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from tandem.deploy.pooled import PooledServer

    server = PooledServer(cfg, resolve=resolve, default_max_new_tokens=default_max_new_tokens)
    pool = ThreadPoolExecutor(max_workers=max(1, server.in_flight), thread_name_prefix="batch-record")

    def close() -> None:
        pool.shutdown(wait=True, cancel_futures=True)
        server.close()

    def rows() -> Iterator[str]:
        futures = [
            pool.submit(record_output, lambda _target: server, p.key, p.line, p.payload, cfg.batch.method) for p in pending
        ]
        for f in as_completed(futures):
            yield f.result()

    return rows(), close


def iter_output(path: str | Path) -> Iterator[dict]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
