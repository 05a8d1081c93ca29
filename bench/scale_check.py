"""`make scale-check`: a target pool follows traffic through gRPC. A real tandem server on
loopback (tiny models, an embedded local Ray) serves a base load, then double that load for
a minute, then the base load again; the target pool must grow during the doubled load and
shrink after it, every request must complete (with the target-only reference text) or be
refused before its first token, and the scale events must show in the log and in
/metrics (tandem_pool_scale_events_total, tandem_pool_replicas).

Traffic is bounded: `clients` threads each keep one request in flight until their phase
ends. tests/service/test_scaling.py runs the same check with short phases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from tandem.services.client import TandemClient, TandemError

TARGET = "small"
PROMPT = "def x return the a of"


def scale_config(root: Path, *, max_replicas: int = 3, downscale_delay_s: float = 15.0) -> dict:
    from tandem.bench.tiny_models import make_service_models

    models = make_service_models(root)
    return {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "max_concurrent": 16, "queue_size": 32},
        "draft_pool": {"model": models["draft"], "dtype": "float32", "quantize": "none", "exits": [2], "exit_adapters": None},
        "targets": [{"name": TARGET, "model": models["small"], "dtype": "float32", "max_replicas": max_replicas}],
        "autoscaling": {"target_ongoing_requests": 2.0, "upscale_delay_s": 1.0, "downscale_delay_s": downscale_delay_s,
                        "interval_s": 0.25},
    }


def scrape(port: int) -> dict[str, float]:
    """The scale series of /metrics: {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(("tandem_pool_scale_events_total", "tandem_pool_replicas"))
    }


class Load:
    """Client threads, one greedy request in flight each, until their group's stop event."""

    def __init__(self, address: str, reference: str, max_new_tokens: int):
        self.address = address
        self.reference = reference
        self.max_new = max_new_tokens
        self.outcomes: Counter = Counter()
        self.problems: list[str] = []
        self._lock = threading.Lock()

    def run(self, clients: int, stop: threading.Event) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, args=(stop,), daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        return threads

    def _client(self, stop: threading.Event) -> None:
        # retries=0: this check counts the server's own refusals (the client would retry them)
        with TandemClient(self.address, retries=0) as client:
            while not stop.is_set():
                try:
                    out = client.generate(target=TARGET, prompt=PROMPT, max_new_tokens=self.max_new, ignore_eos=True,
                                          method="sd", timeout=120)
                    kind = "completed" if out.text == self.reference else "wrong_text"
                except TandemError as exc:
                    sent = exc.partial.token_ids if exc.partial is not None else []
                    kind = "refused" if exc.code.name == "RESOURCE_EXHAUSTED" and not sent else f"error:{exc.code.name}"
                    if kind != "refused":
                        with self._lock:
                            self.problems.append(str(exc)[:200])
                    time.sleep(0.05)
                with self._lock:
                    self.outcomes[kind] += 1


def _listed_replicas(address: str) -> int:
    """What ListModels reports for the target's replicas (live, not the configured count)."""
    with TandemClient(address) as client:
        return next(t["replicas"] for t in client.list_models()["targets"] if t["name"] == TARGET)


def run_scale_check(server, *, base_clients: int, phases_s: tuple[float, float, float], max_new_tokens: int = 32,
                    settle_s: float = 30.0, grow_wait_s: float = 0.0, progress=None) -> dict:
    """Base load, doubled load, base load (phases_s seconds each); then wait up to settle_s
    for the pool to shrink back. With grow_wait_s, the doubled load also lasts until the
    pool has grown (at most grow_wait_s more: a replica's start is a model load, slow on a
    busy machine). `server` is a deploy.serve.BackgroundServer."""
    say = progress or (lambda msg: None)
    scaler = server.app.engine.autoscaler
    assert scaler is not None, "the server scales no pool (max_replicas)"
    pool = server.app.engine.targets[TARGET]
    with TandemClient(server.address) as client:
        reference = client.generate(target=TARGET, prompt=PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True,
                                    method="off").text
    load = Load(server.address, reference, max_new_tokens)
    timeline: list[tuple[float, str, int]] = []
    t0, wall_t0 = time.monotonic(), time.time()
    phase = ["base"]
    stop_sampling, stop_base, stop_extra = threading.Event(), threading.Event(), threading.Event()

    def sample() -> None:
        while not stop_sampling.wait(0.25):
            timeline.append((round(time.monotonic() - t0, 2), phase[0], pool.size))

    def grown() -> bool:
        return any(e.kind == "up" for e in scaler.events)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    base, double, after = phases_s
    say(f"base load: {base_clients} clients for {base:.0f}s")
    threads = load.run(base_clients, stop_base)
    time.sleep(base)
    phase[0] = "double"
    say(f"doubled load: {2 * base_clients} clients for {double:.0f}s (replicas now {pool.size})")
    threads += load.run(base_clients, stop_extra)
    double_end = time.monotonic() + double
    while time.monotonic() < double_end or (time.monotonic() < double_end + grow_wait_s and not grown()):
        time.sleep(0.1)
    listed = {"grown": _listed_replicas(server.address)}
    stop_extra.set()
    phase[0] = "after"
    say(f"base load again for {after:.0f}s (replicas now {pool.size})")
    time.sleep(after)
    stop_base.set()
    for t in threads:
        t.join(timeout=300)
    phase[0] = "settle"
    end = time.monotonic() + settle_s
    while not any(e.kind == "down" for e in scaler.events) and time.monotonic() < end:
        time.sleep(0.25)
    stop_sampling.set()
    sampler.join()
    listed["end"] = _listed_replicas(server.address)
    metrics = scrape(server.app.telemetry.metrics_port) if server.app.telemetry is not None else {}
    by_phase: dict[str, list[int]] = {}
    for _, ph, n in timeline:
        by_phase.setdefault(ph, []).append(n)
    events = [{"t": round(e.at - wall_t0, 2), "kind": e.kind, "replicas": e.replicas, "demand": e.demand, "detail": e.detail}
              for e in scaler.events]
    peak = max(by_phase.get("double", [1]) + by_phase.get("after", [1]))
    summary = {
        "phases_s": {"base": base, "double": double, "after": after, "double_actual": None},
        "clients": {"base": base_clients, "double": 2 * base_clients},
        "outcomes": dict(load.outcomes),
        "problems": load.problems[:20],
        "replicas": {"base_max": max(by_phase.get("base", [1])), "peak": peak, "final": pool.size},
        "events": events,
        "list_models_replicas": listed,
        "metrics": metrics,
        "timeline": timeline[::4],
    }
    double_samples = [t for t, ph, _ in timeline if ph == "double"]
    summary["phases_s"]["double_actual"] = round(double_samples[-1] - double_samples[0], 1) if double_samples else 0.0
    summary["checks"] = {
        "grew_under_double_load": peak > summary["replicas"]["base_max"],
        "shrank_after": pool.size < peak,
        "every_request_completed_or_refused": set(load.outcomes) <= {"completed", "refused"} and load.outcomes["completed"] > 0,
        "events_in_metrics": any(k.startswith("tandem_pool_scale_events_total") and 'kind="up"' in k for k in metrics)
        and any(k.startswith("tandem_pool_scale_events_total") and 'kind="down"' in k for k in metrics),
    }
    summary["passed"] = all(summary["checks"].values())
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.scale_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-clients", type=int, default=2, help="clients of the base load (doubled for the middle phase)")
    ap.add_argument("--base-s", type=float, default=30.0)
    ap.add_argument("--double-s", type=float, default=60.0)
    ap.add_argument("--after-s", type=float, default=60.0)
    ap.add_argument("--output", default="bench/results/scale_check.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tandem.actors.remote import stop_ray
    from tandem.deploy.config import parse_config
    from tandem.deploy.serve import BackgroundServer

    with tempfile.TemporaryDirectory(prefix="tandem-scale-") as tmp:
        server = BackgroundServer(parse_config(scale_config(Path(tmp))), resolve=None)
        try:
            summary = run_scale_check(server, base_clients=args.base_clients,
                                      phases_s=(args.base_s, args.double_s, args.after_s),
                                      progress=lambda m: print(f"[scale-check] {m}", file=sys.stderr, flush=True))
        finally:
            server.stop()
            stop_ray(embedded=True)
    summary["machine"] = f"{os.cpu_count()} cores"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("outcomes", "replicas", "checks", "passed")}))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
