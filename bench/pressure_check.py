"""`make pressure-check`: a target actor's memory stays within its KV budget under a flood of
long requests through gRPC (issue 12). A real tandem server on loopback (embedded local Ray)
serves a target whose KV cache is large per position (4 layers, hidden 512, float32: 8 KiB
per position, ~12 MiB per 1,500-token request) with a small KV budget; `clients` clients each
send one long request at once (bounded: one each). Checks:
- the target actor's resident memory (sampled every 50 ms) never passes
  (its idle resident memory with the model loaded + the budget) x 1.1,
- no actor restarted (the target's and the draft's process ids are those of the start),
- every request completed with the reference text (the same prompt served alone, off) or was
  refused with RESOURCE_EXHAUSTED before its first token.
The negative control runs the same flood with a budget that admits every request at once
(`--control-budget-mib`): its peak must pass the bound computed for the small budget, which
shows the measurement would catch a budget that does not hold. tests/service/
test_memory_pressure.py runs both with fewer requests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from tandem.services.client import TandemClient, TandemError

TARGET = "long"
MiB = 2**20
SLACK = 1.1  # the bound: model + budget, +10%


def _words(n: int) -> str:
    words = "the a of to and in is it for on with as by at from this that def return if else print x y n".split()
    return " ".join(words[(7 * i) % len(words)] for i in range(n))


def pressure_config(root: Path, *, budget_bytes: int, max_concurrent: int, queue_size: int, prompt_tokens: int) -> dict:
    from transformers import GenerationConfig

    from tandem.bench.tiny_models import TINY_WORDS, make_service_models, make_tiny_model, make_tiny_tokenizer

    models = make_service_models(root)  # the tiny draft (vocab 64) drafts for the long target
    long_path = root / TARGET
    if not (long_path / "config.json").is_file():
        make_tiny_model(long_path, seed=21, vocab=TINY_WORDS, layers=4, hidden=512, std=0.3, context=2 * prompt_tokens + 256)
        make_tiny_tokenizer(long_path)
        GenerationConfig(eos_token_id=1).save_pretrained(str(long_path))
    return {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "max_concurrent": max_concurrent,
                   "queue_size": queue_size},
        "draft_pool": {"model": models["draft"], "dtype": "float32", "quantize": "none", "exits": [2], "exit_adapters": None},
        "targets": [{"name": TARGET, "model": str(long_path), "dtype": "float32", "kv_budget_bytes": int(budget_bytes)}],
    }


class RssSampler:
    """Resident memory of some processes every `every_s` seconds, in a thread."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.05):
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.samples: dict[str, list[int]] = {name: [] for name in pids}
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            for name, p in self.procs.items():
                try:
                    self.samples[name].append(p.memory_info().rss)
                except Exception:  # noqa: BLE001 - a dead process: counted as a restart elsewhere
                    pass

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _pids(server) -> dict[str, int]:
    import ray

    engine = server.app.engine
    handles = {"target": engine.targets[TARGET].members[0].handle, "draft": engine.draft_pool.members[0].handle}
    return {name: ray.get(h.info.remote(), timeout=60)["pid"] for name, h in handles.items()}


def run_pressure_check(server, *, clients: int, prompt_tokens: int, max_new_tokens: int = 16, budget_bytes: int,
                       timeout_s: float = 600.0, progress=None) -> dict:
    """`clients` long requests at once against `server` (a deploy.serve.BackgroundServer built
    from pressure_config); returns the summary with its checks."""
    say = progress or (lambda msg: None)
    prompt = _words(prompt_tokens)
    with TandemClient(server.address) as client:
        reference = client.generate(target=TARGET, prompt=prompt, max_new_tokens=max_new_tokens, ignore_eos=True,
                                    method="off", timeout=timeout_s).text
    time.sleep(0.5)
    pids = _pids(server)
    with RssSampler(pids) as idle:
        time.sleep(1.0)
    baseline = sorted(idle.samples["target"])[len(idle.samples["target"]) // 2]
    bound = int((baseline + budget_bytes) * SLACK)
    say(f"target actor idle {baseline / MiB:.0f} MiB, budget {budget_bytes / MiB:.0f} MiB, bound {bound / MiB:.0f} MiB; "
        f"{clients} requests of {prompt_tokens} tokens at once")
    outcomes: Counter = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def one() -> None:
        with TandemClient(server.address, retries=0) as client:  # count the server's own refusals
            start.wait()
            try:
                out = client.generate(target=TARGET, prompt=prompt, max_new_tokens=max_new_tokens, ignore_eos=True,
                                      method="sd", timeout=timeout_s)
                kind = "completed" if out.text == reference else "wrong_text"
            except TandemError as exc:
                sent = exc.partial.token_ids if exc.partial is not None else []
                kind = "refused" if exc.code.name == "RESOURCE_EXHAUSTED" and not sent else f"error:{exc.code.name}"
                if kind != "refused":
                    with lock:
                        problems.append(str(exc)[:200])
        with lock:
            outcomes[kind] += 1

    t0 = time.monotonic()
    with RssSampler(pids) as load:
        threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout_s + 60)
    wall = time.monotonic() - t0
    peak = max(load.samples["target"], default=0)
    after = _pids(server)
    summary = {
        "clients": clients, "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens,
        "budget_mib": round(budget_bytes / MiB, 1), "idle_mib": round(baseline / MiB, 1), "bound_mib": round(bound / MiB, 1),
        "peak_mib": round(peak / MiB, 1), "peak_over_idle_mib": round((peak - baseline) / MiB, 1),
        "draft_idle_mib": round(min(idle.samples["draft"], default=0) / MiB, 1),
        "draft_peak_mib": round(max(load.samples["draft"], default=0) / MiB, 1),
        "outcomes": dict(outcomes), "problems": problems[:10], "wall_s": round(wall, 1), "pids": {"start": pids, "end": after},
    }
    summary["checks"] = {
        "within_budget": peak <= bound,
        "no_actor_restarted": after == pids,
        "every_request_completed_or_refused": set(outcomes) <= {"completed", "refused"} and outcomes["completed"] > 0
        and sum(outcomes.values()) == clients,
    }
    say(f"peak {peak / MiB:.0f} MiB (bound {bound / MiB:.0f}); {dict(outcomes)} in {wall:.0f}s")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.pressure_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64, help="long requests sent at once (one per client)")
    ap.add_argument("--prompt-tokens", type=int, default=1500)
    ap.add_argument("--budget-mib", type=float, default=40.0, help="the target's KV budget (about 3 requests here)")
    ap.add_argument("--max-concurrent", type=int, default=8)
    ap.add_argument("--queue-size", type=int, default=24)
    ap.add_argument("--control-budget-mib", type=float, default=2048.0,
                    help="the negative control's budget: every request admitted at once (0: no control)")
    ap.add_argument("--output", default="bench/results/pressure_check.json")
    args = ap.parse_args(argv)
    for name in ("clients", "prompt_tokens", "max_concurrent", "queue_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.budget_mib <= 0:
        ap.error("--budget-mib: must be > 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tandem.actors.remote import stop_ray
    from tandem.bench.bench import machine_info
    from tandem.deploy.config import parse_config
    from tandem.deploy.serve import BackgroundServer

    def say(msg: str) -> None:
        print(f"[pressure-check] {msg}", file=sys.stderr, flush=True)

    runs = {"budget": (args.budget_mib, args.max_concurrent, args.queue_size)}
    if args.control_budget_mib > 0:
        runs["control"] = (args.control_budget_mib, args.clients, args.clients)
    out: dict = {"machine": machine_info(os.cpu_count() or 1)}
    with tempfile.TemporaryDirectory(prefix="tandem-pressure-") as tmp:
        for name, (budget_mib, max_concurrent, queue_size) in runs.items():
            say(f"{name}: KV budget {budget_mib:.0f} MiB, {max_concurrent} running at most, {queue_size} waiting")
            cfg = pressure_config(Path(tmp), budget_bytes=int(budget_mib * MiB), max_concurrent=max_concurrent,
                                  queue_size=queue_size, prompt_tokens=args.prompt_tokens)
            server = BackgroundServer(parse_config(cfg), resolve=None)
            try:
                out[name] = run_pressure_check(server, clients=args.clients, prompt_tokens=args.prompt_tokens,
                                               budget_bytes=int(budget_mib * MiB), progress=say)
            finally:
                server.stop()
                stop_ray(embedded=True)
    checks = dict(out["budget"]["checks"])
    if "control" in out:
        # the same flood unbounded must pass the small budget's bound: the measurement has power
        checks["control_passes_the_bound"] = out["control"]["peak_mib"] > out["budget"]["bound_mib"]
        checks["control_every_request_completed_or_refused"] = out["control"]["checks"]["every_request_completed_or_refused"]
    out["checks"], out["passed"] = checks, all(checks.values())
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"checks": checks, "passed": out["passed"],
                      **{k: {f: out[k][f] for f in ("idle_mib", "budget_mib", "bound_mib", "peak_mib", "outcomes", "wall_s")}
                         for k in runs}}))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
