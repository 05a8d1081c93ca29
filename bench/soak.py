"""`make soak`: mixed hostile traffic against a real tandem server for a fixed time, with
actors killed and paused at random, on loopback only; writes a summary JSON.

Traffic (bounded: `--clients` threads, each one request at a time, until the time is up):
- greedy requests (every method, both targets, fixed prompts): their text must equal that
  prompt's target-only reference; equal to *another* prompt's reference is a leak;
- sampled requests (seeded), cancelled streams, tight deadlines, malformed requests
  (undecodable bytes, bad fields), bursts beyond the admission limits;
Chaos: every `--chaos-every` seconds (randomised) one actor (the draft, or a target) is
killed (SIGKILL) or paused (SIGSTOP, then SIGCONT after a few seconds).

The summary's verdict (`passed`) requires: 0 crashes (the server still answers health and
requests at the end), 0 hangs past a deadline, 0 leaks, 0 UNKNOWN/INTERNAL codes, memory
growth < 10% (process tree RSS, median of the last minute against the first), and every
accepted request answered (a final message or a clear status within its deadline).

Models: `--models tiny` (default: random tiny models built in seconds, so thousands of
requests run on two cores) or `--models packs` (the default config: real weights).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from tandem.services.client import TandemClient, TandemError
from tandem.speculation.plan import METHODS

REFUSALS = {"RESOURCE_EXHAUSTED"}  # refused before any work: allowed under overload
CLEAN_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "CANCELLED", "UNAVAILABLE"}
BAD_CODES = {"UNKNOWN", "INTERNAL"}
MALFORMED = [
    b"\x12\x05small\x1a\x03\xff\xfe\xfd",  # invalid UTF-8 in prompt
    b"\x12\x05small\x1a\x40abc",  # truncated field
    b"\xff\xff\xff\xff",  # not protobuf at all
]


def tiny_config(root: Path) -> dict:
    from tandem.bench.tiny_models import make_service_models

    models = make_service_models(root)
    return {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None, "max_concurrent": 4, "queue_size": 8,
                   "heartbeat_s": 1.0, "heartbeat_timeout_s": 5.0},
        "draft_pool": {"model": models["draft"], "dtype": "float32", "quantize": "none", "exits": [2], "exit_adapters": None},
        "targets": [
            {"name": "small", "model": models["small"], "dtype": "float32", "max_draft_len": 6},
            {"name": "other", "model": models["other"], "dtype": "float32", "max_draft_len": 6},
        ],
    }


class Traffic:
    """The clients: run in a process of their own (bench.soak.run_traffic), so that the
    soak's memory figure is the server's (its process and its Ray processes) alone."""

    def __init__(self, address: str, *, targets: list[str], seconds: float, clients: int, seed: int, max_new_tokens: int):
        self.address = address
        self.seconds = seconds
        self.clients = clients
        self.rng = random.Random(seed)
        self.max_new = max_new_tokens
        self.targets = targets
        words = "the a an of to and in is it for on with as by at from this that def return if else print x y n".split()
        self.prompts = [" ".join(random.Random(seed + i).choices(words, k=6 + i)) for i in range(8)]
        self.refs: dict[tuple[str, int], list[int]] = {}
        self.counts: Counter = Counter()
        self.codes: Counter = Counter()
        self.problems: list[dict] = []
        self.lock = threading.Lock()
        self.end = 0.0

    # ------------------------------------------------------------------ bookkeeping
    def note(self, kind: str, code: str, **problem) -> None:
        with self.lock:
            self.counts[kind] += 1
            self.codes[code] += 1
            if problem:
                self.problems.append({"kind": kind, "code": code, **problem})
                print(f"[soak] problem: {kind} {code} {problem}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ traffic
    def references(self) -> None:
        print(f"[soak] references for {len(self.prompts)} prompts x {len(self.targets)} targets", file=sys.stderr, flush=True)
        # retries=0 throughout: the soak counts the server's own answers, refusals included
        with TandemClient(self.address, retries=0) as c:
            for t in self.targets:
                for i, p in enumerate(self.prompts):
                    self.refs[(t, i)] = c.generate(target=t, prompt=p, max_new_tokens=self.max_new, ignore_eos=True, method="off", timeout=120).token_ids

    def one(self, c: TandemClient, rng: random.Random) -> None:
        kind = rng.choices(["greedy", "sampled", "cancel", "deadline", "malformed", "burst"], weights=[40, 15, 10, 10, 15, 3])[0]
        target, i = rng.choice(self.targets), rng.randrange(len(self.prompts))
        deadline = 60.0
        t0 = time.monotonic()
        try:
            if kind == "greedy":
                out = c.generate(target=target, prompt=self.prompts[i], max_new_tokens=self.max_new, ignore_eos=True,
                                 method=rng.choice(METHODS), request_id=rng.choice(["", "dup", f"id-{i}"]), timeout=deadline)
                ref = self.refs[(target, i)]
                if out.token_ids != ref:
                    others = [k for k, v in self.refs.items() if v == out.token_ids and k != (target, i)]
                    self.note(kind, "OK", leak=bool(others), mismatch=True, target=target, prompt=i)
                    return
            elif kind == "sampled":
                c.generate(target=target, prompt=self.prompts[i], max_new_tokens=self.max_new, temperature=0.8,
                           seed=rng.randrange(2**32), method=rng.choice(METHODS), timeout=deadline)
            elif kind == "cancel":
                stream = c.generate_stream(target=target, prompt=self.prompts[i], max_new_tokens=200, ignore_eos=True, timeout=deadline)
                next(iter(stream))
                stream.cancel()
            elif kind == "deadline":
                deadline = rng.uniform(0.02, 0.5)
                c.generate(target=target, prompt=self.prompts[i], max_new_tokens=self.max_new, ignore_eos=True, timeout=deadline)
            elif kind == "malformed":
                self.malformed(rng)
                return
            else:
                self.burst(target, i)
                return
            code = "OK"
        except TandemError as exc:
            code = exc.code.name
        except StopIteration:
            code = "OK"
        took = time.monotonic() - t0
        problem = {}
        if code in BAD_CODES:
            problem["bad_code"] = code
        if took > deadline + 5.0:
            problem["hang_s"] = round(took, 2)
        if code not in {"OK"} | REFUSALS | CLEAN_ERRORS:
            problem["unexpected"] = code
        self.note(kind, code, **problem)

    def malformed(self, rng: random.Random) -> None:
        with grpc.insecure_channel(self.address) as ch:
            call = ch.unary_stream("/tandem.v1.Tandem/Generate", request_serializer=None, response_deserializer=None)
            payload = rng.choice(MALFORMED + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))])
            try:
                list(call(payload, timeout=10))
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
        self.note("malformed", code, **({"bad_code": code} if code in BAD_CODES else {}))

    def burst(self, target: str, i: int) -> None:
        def ask(_):
            with TandemClient(self.address, retries=0) as c:
                try:
                    c.generate(target=target, prompt=self.prompts[i], max_new_tokens=8, timeout=60)
                    return "OK"
                except TandemError as exc:
                    return exc.code.name

        with ThreadPoolExecutor(24) as pool:
            for code in pool.map(ask, range(24)):
                self.note("burst", code, **({"bad_code": code} if code in BAD_CODES else {}))

    def client_loop(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        with TandemClient(self.address, retries=0) as c:
            while time.monotonic() < self.end:
                try:
                    self.one(c, rng)
                except Exception as exc:  # noqa: BLE001 - a soak records, never dies
                    self.note("client", "EXCEPTION", error=f"{type(exc).__name__}: {exc}")

    def run(self) -> dict:
        self.references()
        self.start = time.monotonic()
        self.end = self.start + self.seconds
        threads = [threading.Thread(target=self.client_loop, args=(i,), daemon=True) for i in range(self.clients)]
        for t in threads:
            t.start()
        while time.monotonic() < self.end:
            time.sleep(min(60, max(0.1, self.end - time.monotonic())))
            with self.lock:
                done = sum(self.counts.values())
            print(f"[soak] {time.monotonic() - self.start:.0f}/{self.seconds:.0f}s: {done} requests, "
                  f"{len(self.problems)} problems", file=sys.stderr, flush=True)
        for t in threads:
            t.join(timeout=120)
        alive = True
        try:  # the server after the storm: healthy, and still exact
            with TandemClient(self.address, retries=0) as c:
                alive = c.health() == "SERVING"
                for t in self.targets:
                    alive &= c.generate(target=t, prompt=self.prompts[0], max_new_tokens=self.max_new, ignore_eos=True,
                                        method="off", timeout=120).token_ids == self.refs[(t, 0)]
        except Exception:  # noqa: BLE001
            alive = False
        return {"alive": alive, "hung_threads": sum(t.is_alive() for t in threads), "counts": dict(self.counts),
                "codes": dict(self.codes), "problems": self.problems}


def run_traffic(address: str, targets: list[str], seconds: float, clients: int, seed: int, max_new_tokens: int) -> dict:
    """The child process's entry point."""
    return Traffic(address, targets=targets, seconds=seconds, clients=clients, seed=seed, max_new_tokens=max_new_tokens).run()


class Soak:
    """The server side: the server (in this process), chaos on its actors, and memory."""

    def __init__(self, server, *, seconds: float, clients: int, chaos_every: float, seed: int, max_new_tokens: int):
        self.server = server
        self.seconds = seconds
        self.clients = clients
        self.chaos_every = chaos_every
        self.seed = seed
        self.max_new = max_new_tokens
        self.rng = random.Random(seed)
        self.chaos: list[dict] = []
        self.rss: list[tuple[float, int, int]] = []  # (t, this process, its Ray processes)
        self.kinds: list[tuple[float, Counter]] = []  # (t, RSS by kind of Ray process)
        self.start = self.end = 0.0

    def actors(self) -> list[tuple[str, object]]:
        eng = self.server.engine
        out = [("draft", m.handle) for m in eng.draft_pool.members] if eng.draft_pool else []
        for name, pool in eng.targets.items():
            out += [(f"target:{name}", m.handle) for m in pool.members]
        return out

    def chaos_loop(self) -> None:
        import ray

        while True:
            wait = self.rng.uniform(0.5, 1.5) * self.chaos_every
            if time.monotonic() + wait > self.end - 30:
                return  # the last half minute runs calm: everything must have healed
            time.sleep(wait)
            name, handle = self.rng.choice(self.actors())
            try:
                pid = ray.get(handle.ping.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - restarting: skip this round
                continue
            action = self.rng.choice(["kill", "pause"])
            event = {"t": round(time.monotonic() - self.start, 1), "actor": name, "action": action}
            self.chaos.append(event)
            print(f"[soak] chaos: {event}", file=sys.stderr, flush=True)
            try:
                if action == "kill":
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(self.rng.uniform(2, 12))
                    os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # replaced already (the heartbeat monitor kills a hung actor)

    def _rss(self, exclude: set[int]) -> tuple[int, int, Counter]:
        import psutil

        me = psutil.Process()
        own, ray_tree, kinds = me.memory_info().rss, 0, Counter()
        for p in me.children(recursive=True):
            if p.pid in exclude:
                continue
            try:
                rss, cmd = p.memory_info().rss, " ".join(p.cmdline())
            except psutil.Error:
                continue
            ray_tree += rss
            kind = next((k for k in ("raylet", "gcs_server", "DraftWorker", "TargetWorker", "dashboard", "runtime_env", "log_monitor") if k in cmd), "other")
            kinds[kind] += rss
        return own, ray_tree, kinds

    def memory_loop(self, exclude: set[int]) -> None:
        while time.monotonic() < self.end:
            own, ray_tree, kinds = self._rss(exclude)
            self.rss.append((time.monotonic() - self.start, own, ray_tree))
            self.kinds.append((time.monotonic() - self.start, kinds))
            time.sleep(5)

    def run(self) -> dict:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        targets = list(self.server.app.router.routes)
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            traffic_pid = set(pool.submit(os.getpid).result() for _ in range(1))
            fut = pool.submit(run_traffic, self.server.address, targets, self.seconds, self.clients, self.seed, self.max_new)
            self.start = time.monotonic()
            self.end = self.start + self.seconds
            helpers = [threading.Thread(target=self.chaos_loop, daemon=True),
                       threading.Thread(target=self.memory_loop, args=(traffic_pid,), daemon=True)]
            for t in helpers:
                t.start()
            traffic = fut.result()
        return self.summary(traffic)

    def summary(self, traffic: dict) -> dict:
        def med(rows, col, pick):
            vals = [r[col] for r in rows if pick(r[0])] or [r[col] for r in rows[-1:]]
            return statistics.median(vals) if vals else 0

        first = lambda t: t < 120  # noqa: E731 - warm-up included: the soak starts on a warm server
        last = lambda t: t > self.seconds - 120  # noqa: E731
        total_first = med(self.rss, 1, first) + med(self.rss, 2, first)
        total_last = med(self.rss, 1, last) + med(self.rss, 2, last)
        growth = total_last / total_first - 1.0 if total_first else 0.0
        problems = traffic["problems"]
        leaks = sum(1 for p in problems if p.get("leak"))
        mismatches = sum(1 for p in problems if p.get("mismatch"))
        hangs = sum(1 for p in problems if "hang_s" in p) + traffic["hung_threads"]
        bad = sum(1 for p in problems if "bad_code" in p)
        unexpected = sum(1 for p in problems if "unexpected" in p or p.get("code") == "EXCEPTION")
        mb = lambda x: round(x / 2**20, 1)  # noqa: E731
        out = {
            "seconds": self.seconds,
            "requests": sum(traffic["counts"].values()),
            "by_kind": traffic["counts"],
            "by_code": traffic["codes"],
            "chaos_events": self.chaos,
            "crashes": 0 if traffic["alive"] else 1,
            "hangs_past_deadline": hangs,
            "cross_request_leaks": leaks,
            "greedy_mismatches": mismatches,
            "unknown_or_internal": bad,
            "unexpected_outcomes": unexpected,
            "memory_server_process_mb": [mb(med(self.rss, 1, first)), mb(med(self.rss, 1, last))],
            "memory_ray_processes_mb": [mb(med(self.rss, 2, first)), mb(med(self.rss, 2, last))],
            "memory_growth": round(growth, 4),
            "memory_series_mb": [(round(t), mb(a), mb(b)) for t, a, b in self.rss[::6]],
            "memory_ray_by_kind_mb": {
                k: [mb(statistics.median([c[k] for t, c in self.kinds if first(t)] or [0])),
                    mb(statistics.median([c[k] for t, c in self.kinds if last(t)] or [0]))]
                for k in sorted({k for _, c in self.kinds for k in c})
            },
            "problems": problems[:50],
        }
        out["passed"] = bool(
            traffic["alive"] and hangs == 0 and leaks == 0 and mismatches == 0 and bad == 0 and unexpected == 0 and growth < 0.10
        )
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long traffic runs (default 30)")
    ap.add_argument("--clients", type=int, default=6, help="client threads, one request in flight each (default 6)")
    ap.add_argument("--chaos-every", type=float, default=45.0, help="mean seconds between actor kills/pauses (default 45)")
    ap.add_argument("--models", choices=["tiny", "packs"], default="tiny")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="bench/results/soak.json", help="summary JSON (default bench/results/soak.json)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tandem.actors.remote import stop_ray
    from tandem.deploy.config import TandemConfig, parse_config
    from tandem.deploy.serve import BackgroundServer

    with tempfile.TemporaryDirectory(prefix="tandem-soak-") as tmp:
        if args.models == "tiny":
            server = BackgroundServer(parse_config(tiny_config(Path(tmp))), resolve=None)
        else:
            server = BackgroundServer(TandemConfig())
        try:
            soak = Soak(server, seconds=args.minutes * 60, clients=args.clients, chaos_every=args.chaos_every,
                        seed=args.seed, max_new_tokens=args.max_new_tokens)
            summary = soak.run()
        finally:
            server.stop()
            stop_ray(embedded=True)
    summary["models"] = args.models
    summary["machine"] = f"{os.cpu_count()} cores"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    keys = ("requests", "crashes", "hangs_past_deadline", "cross_request_leaks", "greedy_mismatches", "unknown_or_internal",
            "unexpected_outcomes", "memory_growth", "passed")
    print(json.dumps({k: summary[k] for k in keys}))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
