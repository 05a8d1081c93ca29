"""Pools that follow traffic, on a real local Ray cluster with tiny models: under load a
target pool grows to its bound (a new placement group, a new actor, in rotation once
loaded); when the load falls it drains a replica that is still streaming, lets the stream
finish, then ends it. Every request's output equals the target-only reference."""

from __future__ import annotations

import threading
import time

from tandem.actors.autoscale import ScalePolicy
from tandem.actors.engine import ActorEngine
from tandem.actors.pools import DraftPool, DraftPoolSpec, TargetPool, TargetSpec
from tandem.actors.speculative import SpecConfig
from tandem.actors.workers import ModelLoad

PROMPT = [0, 1, 2]


def slow(per_call_s: float):
    """An on_tokens callback that makes a request last: the engine calls it every round."""
    return lambda tokens: time.sleep(per_call_s)


def test_target_pool_grows_under_load_then_drains_a_streaming_replica(ray_local, tiny_paths):
    target_path, draft_path = tiny_paths
    draft = DraftPool(DraftPoolSpec(load=ModelLoad(path=draft_path, dtype="float32", exits=(2,))))
    pool = TargetPool(TargetSpec(name="t", load=ModelLoad(path=target_path, dtype="float32"), replicas=1))
    eng = ActorEngine(draft, {"t": pool}, heartbeat_s=None)
    try:
        short = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=60).tokens
        long = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=400).tokens
        drained_while_busy: list[int] = []

        def on_event(event):
            if event.kind == "drain":
                drained_while_busy.extend(m.inflight for m in pool.members if m.draining)

        policy = ScalePolicy(min_replicas=1, max_replicas=2, target_ongoing_requests=2.0,
                             upscale_delay_s=0.3, downscale_delay_s=3.0, load_timeout_s=120)
        scaler = eng.start_autoscaler({"t": policy}, on_event=on_event, interval_s=0.1)
        assert pool.size == 1

        # load: 4 clients (demand 4 > 2 per replica) until the pool has grown and the grown
        # pool has served 8 more requests
        stop = threading.Event()
        outputs, errors, busy_replicas = [], [], set()

        def client():
            while not stop.is_set():
                try:
                    out = eng.generate("t", PROMPT, spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=60, on_tokens=slow(0.01))
                    outputs.append(out.tokens)
                except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                    errors.append(exc)
                    return
                busy_replicas.update(i for i, m in enumerate(pool.members) if m.inflight)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 90
        while pool.size < 2 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        served_before = len(outputs)
        while len(outputs) < served_before + 8 and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        assert pool.size == 2, [e.kind for e in scaler.events]
        assert busy_replicas == {0, 1}  # the new replica took requests
        assert outputs and all(o == short for o in outputs)

        # the load falls to 2 long streams (one per replica, the two being idle): demand 2
        # wants 1 replica, so after the delay one replica is drained while it streams; its
        # stream finishes (each lasts >= 400 x 15 ms = 6 s > the 3 s delay), then it ends
        long_outputs = []

        def long_client():
            out = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=400, on_tokens=slow(0.015))
            long_outputs.append(out.tokens)

        streams = [threading.Thread(target=long_client) for _ in range(2)]
        for t in streams:
            t.start()
        for t in streams:
            t.join(timeout=120)
        assert long_outputs == [long, long]
        end = time.monotonic() + 30
        while time.monotonic() < end and [e.kind for e in scaler.events][-1:] != ["down"]:
            time.sleep(0.1)
        kinds = [e.kind for e in scaler.events]
        assert kinds == ["up", "drain", "down"], kinds
        assert drained_while_busy == [1], drained_while_busy  # drained mid-stream, not idle
        assert pool.size == 1 and sum(m.retired for m in pool.members) == 1
        assert [e.replicas for e in scaler.events] == [2, 1, 1]
        # the pool still serves, on the replica it kept
        assert eng.generate("t", PROMPT, spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=60).tokens == short
        assert all(v == [] for v in eng.live_requests().values())
    finally:
        eng.shutdown()
