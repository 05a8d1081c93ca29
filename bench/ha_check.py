"""`make ha-check`: two routers share one set of pools (ray.shared_pools), so that no router
is a single point of failure. On a Ray cluster on this machine (tiny models, loopback only,
bounded load), two `tandem serve` processes join the cluster: the first starts the draft and
target pools, the second attaches to them. Clients reach both through one channel
("ipv4:127.0.0.1:A,127.0.0.1:B", round-robin, as behind a Kubernetes Service) while:

1. router A is killed (SIGKILL) mid-load: only the streams it was carrying fail; every
   request started afterwards completes on router B; the pools' actors are the same
   processes throughout (nothing reloaded); router B closes the dead router's requests
   left on the actors;
2. router A restarts: it attaches in a fraction of a first start (no model load);
3. router B is stopped gracefully (SIGTERM, a rolling upgrade) and restarted: no request
   fails at all.

Every completed request's text equals the target-only reference. Prints and writes one JSON
summary (`passed` when every check holds). Not part of `make test` (tests/service/
test_router_failover.py runs it with short phases).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from tandem.services.client import TandemClient, TandemError

TARGET = "small"
PROMPT = "def x return the a of"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ha_config(root: Path, *, router_lease_s: float = 6.0) -> dict:
    from tandem.bench.tiny_models import make_service_models

    models = make_service_models(root)
    return {
        "server": {"host": "127.0.0.1", "metrics_port": None, "max_concurrent": 8, "queue_size": 16,
                   "heartbeat_s": 1.0, "heartbeat_timeout_s": 10.0},
        "ray": {"shared_pools": True, "router_lease_s": router_lease_s},
        "draft_pool": {"model": models["draft"], "dtype": "float32", "quantize": "none", "exits": [2], "exit_adapters": None},
        "targets": [{"name": TARGET, "model": models["small"], "dtype": "float32"}],
    }


class Router:
    """One `tandem serve` process joined to the cluster, on its own port."""

    def __init__(self, name: str, config: Path, address: str, port: int, log_dir: Path):
        self.name, self.config, self.address, self.port = name, config, address, port
        self.log_path = log_dir / f"router_{name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []  # seconds from spawn to SERVING, per start

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300.0) -> float:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("RAY_ADDRESS", None)
        t0 = time.monotonic()
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tandem.deploy.cli", "serve", "--config", str(self.config),
                 "--address", self.address, "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router {self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with TandemClient(self.endpoint, retries=0) as client:
                    if client.health(timeout=2.0) == "SERVING":
                        self.starts.append(time.monotonic() - t0)
                        return self.starts[-1]
            except TandemError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"router {self.name} not serving within {timeout_s:.0f}s; see {self.log_path}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


class Load:
    """Client threads on one round-robin channel to every router, one greedy request in
    flight each; each request's (start, end, outcome, tokens received before a failure)."""

    def __init__(self, address: str, reference: str, max_new_tokens: int):
        self.address, self.reference, self.max_new = address, reference, max_new_tokens
        self.records: list[tuple[float, float, str, int]] = []
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, clients: int) -> None:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(180)

    def _client(self) -> None:
        with TandemClient(self.address, retries=4) as client:
            while not self._stop.is_set():
                t0, sent = time.monotonic(), 0
                try:
                    out = client.generate(target=TARGET, prompt=PROMPT, max_new_tokens=self.max_new, ignore_eos=True,
                                          method="sd", timeout=120)
                    kind = "completed" if out.text == self.reference else "wrong_text"
                except TandemError as exc:
                    sent = len(exc.partial.token_ids) if exc.partial is not None else 0
                    kind = f"error:{exc.code.name}"
                    with self._lock:
                        self.problems.append(f"{time.monotonic() - t0:.2f}s after start, {sent} tokens: {str(exc)[:160]}")
                    time.sleep(0.05)
                with self._lock:
                    self.records.append((t0, time.monotonic(), kind, sent))


HELD_TOKENS = 2000  # a stream this long outlives the kill by far (tiny models, context 8192)


class HeldStream:
    """One long greedy stream straight to one router, in a thread; `started` is set once its
    first chunk arrived (its request state is then on the actors)."""

    def __init__(self, endpoint: str, max_new_tokens: int):
        self.started = threading.Event()
        self.outcome = "running"
        self._thread = threading.Thread(target=self._run, args=(endpoint, max_new_tokens), daemon=True)
        self._thread.start()

    def _run(self, endpoint: str, max_new_tokens: int) -> None:
        try:
            with TandemClient(endpoint, retries=0) as client, client.generate_stream(
                    target=TARGET, prompt=PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True, method="sd",
                    timeout=300) as stream:
                for _ in stream:
                    self.started.set()
            self.outcome = "completed"
        except TandemError as exc:
            self.outcome = f"error:{exc.code.name}"
        finally:
            self.started.set()  # never leave the waiter hanging (a failed start shows in outcome)

    def finish(self, timeout_s: float = 30.0) -> str:
        self._thread.join(timeout_s)
        return self.outcome


def pool_processes(namespace: str) -> dict[str, list]:
    """Per shared pool: (actor name, pid) of each listed replica, from the directory."""
    import ray

    from tandem.actors.directory import DIRECTORY_NAME

    listing = ray.get(ray.get_actor(DIRECTORY_NAME, namespace=namespace).pools.remote(), timeout=30)
    out = {}
    for key, rec in sorted(listing.items()):
        out[key] = [(m["name"], ray.get(ray.get_actor(m["name"], namespace=namespace).ping.remote(), timeout=30))
                    for m in rec["members"]]
    return out


def live_on_actors(namespace: str) -> dict[str, list]:
    import ray

    from tandem.actors.directory import DIRECTORY_NAME

    listing = ray.get(ray.get_actor(DIRECTORY_NAME, namespace=namespace).pools.remote(), timeout=30)
    return {m["name"]: ray.get(ray.get_actor(m["name"], namespace=namespace).live_requests.remote(), timeout=30)
            for rec in listing.values() for m in rec["members"]}


def run_ha_check(address: str, root: Path, *, namespace: str, clients: int = 3, phase_s: float = 6.0,
                 max_new_tokens: int = 48, reap_wait_s: float = 60.0, say=print) -> dict:
    """The check on the Ray cluster at `address` (this process must be connected to it as a
    driver in `namespace`)."""
    import yaml

    cfg = ha_config(root)
    cfg["ray"]["namespace"] = namespace
    config = root / "ha.yaml"
    config.write_text(yaml.safe_dump(cfg))
    a = Router("a", config, address, free_port(), root)
    b = Router("b", config, address, free_port(), root)
    checks: dict[str, bool] = {}
    summary: dict = {"checks": checks, "clients": clients, "phase_s": phase_s, "max_new_tokens": max_new_tokens}
    load = None
    try:
        summary["a_first_start_s"] = round(a.start(), 2)
        summary["b_start_s"] = round(b.start(), 2)
        say(f"router a served after {summary['a_first_start_s']}s (pools started), router b after {summary['b_start_s']}s (attached)")
        before = pool_processes(namespace)
        with TandemClient(a.endpoint) as client:
            reference = client.generate(target=TARGET, prompt=PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True,
                                        method="off").text
        both = f"ipv4:{a.endpoint},{b.endpoint}"
        load = Load(both, reference, max_new_tokens)
        load.start(clients)
        time.sleep(phase_s)

        # the dead router's requests on the actors are closed by router b (its heartbeat),
        # once a's lease (router_lease_s) has lapsed
        def orphans() -> list[str]:
            return [k for keys in live_on_actors(namespace).values() for k in keys if not k.startswith(owner_prefix(b))]

        # kill a while it surely carries a stream: one long request straight to a, killed once
        # its first tokens arrived (the load's short streams may all sit between requests at
        # the instant of the kill on a slow machine, and then no state would be left to close)
        held = HeldStream(a.endpoint, HELD_TOKENS)
        if not held.started.wait(60.0):
            raise TimeoutError(f"router a sent no token of a {HELD_TOKENS}-token stream within 60s")
        summary["held_stream_running_at_kill"] = held.outcome == "running"
        t_kill = time.monotonic()
        a.kill()
        summary["orphans_seen"] = len(orphans())  # state a's streams left on the actors
        say(f"router a killed (SIGKILL) under load; {len(load.records)} requests so far, "
            f"{summary['orphans_seen']} of its request states left on the actors")
        # watch them go (the phase, or longer while some are left, up to reap_wait_s)
        left = orphans()
        while time.monotonic() - t_kill < max(phase_s, reap_wait_s if left else 0.0):
            time.sleep(0.5)
            if left:
                left = orphans()
                if not left:
                    summary["orphans_closed_after_kill_s"] = round(time.monotonic() - t_kill, 1)
            elif time.monotonic() - t_kill >= phase_s:
                break
        summary["orphans_left"] = len(left)
        summary["held_stream_outcome"] = held.finish()
        after_kill = pool_processes(namespace)

        summary["a_restart_s"] = round(a.start(), 2)
        say(f"router a restarted: serving after {summary['a_restart_s']}s (attached)")
        time.sleep(phase_s)

        t_roll = time.monotonic()
        rc = b.stop()
        summary["b_sigterm_exit"] = rc
        say("router b stopped gracefully (SIGTERM), restarting it")
        summary["b_restart_s"] = round(b.start(), 2)
        time.sleep(phase_s)
        t_roll_end = time.monotonic()
        load.stop()
        end = pool_processes(namespace)

        direct = {}
        for r in (a, b):
            with TandemClient(r.endpoint) as client:
                direct[r.name] = client.generate(target=TARGET, prompt=PROMPT, max_new_tokens=max_new_tokens,
                                                 ignore_eos=True, method="sd").text == reference

        recs = load.records
        at_kill = [r for r in recs if r[0] < t_kill < r[1]]
        failed = [r for r in recs if r[2] != "completed"]
        lost = [r for r in failed if r[0] < t_kill <= r[1]]  # in flight when a died
        started_after_kill = [r for r in recs if r[0] >= t_kill]
        rolling = [r for r in recs if r[1] >= t_roll and r[0] <= t_roll_end]
        outcomes = Counter(r[2] for r in recs)
        summary.update({
            "requests": len(recs), "outcomes": dict(outcomes), "in_flight_at_kill": len(at_kill),
            "failed_in_flight_at_kill": len(lost), "started_after_kill": len(started_after_kill),
            "during_rolling_restart": len(rolling), "pools_before": before, "pools_end": end,
            "direct_requests_match": direct, "problems": load.problems[:10],
        })
        checks["same_pool_processes_throughout"] = before == after_kill == end
        checks["only_streams_on_the_killed_router_failed"] = len(failed) == len(lost) and len(lost) <= len(at_kill)
        checks["every_request_after_the_kill_completed"] = all(r[2] == "completed" for r in started_after_kill) and len(started_after_kill) > 0
        checks["rolling_restart_failed_nothing"] = all(r[2] == "completed" for r in rolling) and len(rolling) > 0
        checks["restart_attaches_faster_than_first_start"] = summary["a_restart_s"] < summary["a_first_start_s"]
        # orphans_seen is the control: a's streams left state behind (else nothing was shown)
        checks["dead_router_requests_closed_on_actors"] = (summary["orphans_left"] == 0 and summary["orphans_seen"] > 0
                                                           and summary["held_stream_running_at_kill"])
        checks["no_wrong_text"] = outcomes.get("wrong_text", 0) == 0
        checks["both_routers_serve_at_the_end"] = all(direct.values())
        summary["passed"] = all(checks.values())
        return summary
    finally:
        if load is not None:
            load.stop()
        for r in (a, b):
            try:
                r.stop()
            except Exception:  # noqa: BLE001
                if r.proc is not None:
                    r.proc.kill()


def owner_prefix(router: Router) -> str:
    """The prefix a router's requests carry on the actors (its owner id)."""
    from tandem.actors.directory import router_prefix

    return router_prefix(router.proc.pid)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="write the JSON summary here")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    import ray

    from tandem.actors.directory import pools_down

    namespace = "tandem-ha-check"
    with tempfile.TemporaryDirectory(prefix="tandem-ha-") as tmp:
        ray.init(address="local", num_cpus=2, resources={"draft_pool": 2, "target_pool": 2}, include_dashboard=False,
                 log_to_driver=False, namespace=namespace)
        try:
            address = ray.get_runtime_context().gcs_address
            summary = run_ha_check(address, Path(tmp), namespace=namespace, clients=args.clients, phase_s=args.phase_s,
                                   max_new_tokens=args.max_new_tokens, say=lambda m: print(f"[ha-check] {m}", flush=True))
            summary["machine"] = f"{os.cpu_count()} CPUs"
        finally:
            pools_down()
            ray.shutdown()
    print(json.dumps(summary, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
