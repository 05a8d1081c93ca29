"""Shared pools (actors/directory.py) on a real local Ray cluster with tiny models: pools one
router (a separate driver process) started outlive it, and a second router attaches to the
very same actors, loading nothing, with output equal to the target-only reference; a pool
one router grows, drains and retires is seen by the other, and a replica another router
still streams on is not retired under it; a router with another model is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tandem.actors.directory import DIRECTORY_NAME, SharedPool, attach_or_create, pools_down, spec_fingerprint
from tandem.actors.engine import ActorEngine
from tandem.actors.pools import DraftPool, DraftPoolSpec, TargetPool, TargetSpec
from tandem.actors.remote import control_call
from tandem.actors.speculative import SpecConfig
from tandem.actors.workers import ModelLoad

PROMPT = [0, 1, 2]
CONTROL = "tandem-test-not-detached"


def specs(tiny_paths, *, target_path=None):
    target, draft = tiny_paths
    return (DraftPoolSpec(load=ModelLoad(path=draft, dtype="float32", exits=(2,))),
            TargetSpec(name="t", load=ModelLoad(path=target_path or target, dtype="float32")))


def shared_engine(tiny_paths, owner: str, **kw) -> ActorEngine:
    draft_spec, target_spec = specs(tiny_paths, **kw)
    draft = DraftPool(draft_spec, timeout_s=120, shared=SharedPool(key="draft", owner=owner, settle_s=0.5))
    target = TargetPool(target_spec, timeout_s=120, shared=SharedPool(key="target:t", owner=owner, settle_s=0.5))
    return ActorEngine(draft, {"t": target}, heartbeat_s=None)


def gone(name: str, timeout_s: float = 30.0) -> bool:
    """Whether no actor answers to `name` (a killed one leaves Ray's name table shortly)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def cluster(ray_local):
    """The session's Ray; every shared pool (and the directory) ended afterwards."""
    yield ray_local
    pools_down()


ROUTER_A = textwrap.dedent("""
    import json, sys, ray
    from tandem.actors.directory import PoolDirectory
    from tandem.actors.speculative import SpecConfig
    sys.path.insert(0, sys.argv[3])
    from test_shared_pools import shared_engine
    ray.init(address=sys.argv[1], namespace="tandem-tests", log_to_driver=False)
    eng = shared_engine(json.loads(sys.argv[2]), owner="router-a")
    # negative control: a named actor that is not detached ends with this driver
    ctl = ray.remote(PoolDirectory).options(name="%s", num_cpus=0).remote()
    ray.get(ctl.ping.remote())
    out = eng.generate("t", [0, 1, 2], spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=40)
    pids = {"draft": ray.get(eng.draft_pool.members[0].handle.ping.remote()),
            "target": ray.get(eng.targets["t"].members[0].handle.ping.remote())}
    print(json.dumps({"tokens": out.tokens, "pids": pids}))
    # exits without shutting anything down, as a killed router would
""" % CONTROL)


def test_pools_outlive_the_router_that_started_them_and_a_second_router_attaches(cluster, tiny_paths, tmp_path):
    import ray

    address = ray.get_runtime_context().gcs_address
    script = tmp_path / "router_a.py"
    script.write_text(ROUTER_A)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), address, json.dumps([str(p) for p in tiny_paths]), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads(proc.stdout.strip().splitlines()[-1])

    # the control fires: router A's non-detached named actor ended with it
    assert gone(CONTROL), "a non-detached named actor outlived its driver: the control cannot fire"

    t1 = time.monotonic()
    eng = shared_engine(tiny_paths, owner="router-b")  # attaches: the directory lists both pools
    attach_s = time.monotonic() - t1
    try:
        pids = {"draft": ray.get(eng.draft_pool.members[0].handle.ping.remote()),
                "target": ray.get(eng.targets["t"].members[0].handle.ping.remote())}
        assert pids == a["pids"]  # the same processes: nothing was loaded again
        assert len(eng.targets["t"].members) == 1 and len(eng.draft_pool.members) == 1
        reference = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=40).tokens
        again = eng.generate("t", PROMPT, spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=40).tokens
        assert a["tokens"] == reference == again
        print(f"router A (start + load + 1 request) {t1 - t0:.1f}s; router B attached in {attach_s:.2f}s")
        # a router that exits leaves shared pools running for the others
        eng.shutdown()
        assert ray.get(eng.targets["t"].members[0].handle.ping.remote()) == a["pids"]["target"]
    finally:
        eng.shutdown()


def test_a_pool_grown_drained_and_retired_by_one_router_is_followed_by_the_other(cluster, tiny_paths):

    a = shared_engine(tiny_paths, owner="router-a")
    b = shared_engine(tiny_paths, owner="router-b")
    pa, pb = a.targets["t"], b.targets["t"]
    try:
        assert pa.members[0].name == pb.members[0].name  # b attached to a's replica
        assert pa.may_scale() and not pb.may_scale()  # one scaling lease per pool
        reference = a.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=300).tokens

        pa.add_replica(timeout_s=120)
        pb.sync()
        assert [m.name for m in pb.members] == [m.name for m in pa.members] and pb.size == 2

        # b streams on the newest replica (it keeps its one request on it), then a drains it
        newest = pa.members[1].name
        held = threading.Event()
        release = threading.Event()
        out = {}

        def slow(tokens):
            held.set()
            release.wait(30)

        pb.members[0].inflight += 100  # b's choice: the newest replica
        worker = threading.Thread(target=lambda: out.setdefault("tokens", b.generate(
            "t", PROMPT, spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=300, on_tokens=slow).tokens))
        worker.start()
        assert held.wait(60)
        pb.members[0].inflight -= 100
        member = pa.start_draining()
        assert member.name == newest
        pb.sync()
        assert pb.members[1].draining and pb.size == 1  # b takes no new request there
        time.sleep(1.0)  # past settle_s
        assert pa.members[1].inflight == 0 and not pa.idle(member)  # b's stream holds it
        release.set()
        worker.join(60)
        assert out["tokens"] == reference  # the stream finished on the draining replica
        deadline = time.monotonic() + 10
        while not pa.idle(member) and time.monotonic() < deadline:
            time.sleep(0.1)
        pa.retire(member)
        pb.sync()
        assert pb.members[1].retired and pb.size == 1
        assert gone(newest)
        # a listed replica whose actor is gone is skipped (logged), the rest still followed;
        # a router attaching to a pool listing only such replicas gets a clear error
        ghost = {"name": "tandem-target-t-ghost", "shards": [], "pg": None, "draining": False}
        pa.shared.call("add", "target:t", ghost)
        pb.sync()
        assert [m.name for m in pb.members if not m.retired] == [pa.members[0].name]
        pa.shared.call("remove", "target:t", ghost["name"])
        pa.shared.call("create", "target:ghosts", spec_fingerprint(pa.spec), [ghost])
        with pytest.raises(ValueError, match="ray.shared_pools: pool 'target:ghosts' lists a replica whose actor is gone"):
            attach_or_create(pa, SharedPool(key="target:ghosts", owner="router-c"), pa.spec, 1, timeout_s=5)
        pa.shared.call("drop", "target:ghosts")
        # the lease passes on when its holder stops renewing it
        pa.shared.call("release", "scale:target:t", "router-a")
        assert pb.may_scale() and not pa.may_scale()
    finally:
        a.shutdown()
        b.shutdown()


def test_a_router_with_another_model_is_refused(cluster, tiny_paths, tmp_path):
    from tandem.bench.tiny_models import make_tiny_model

    first = shared_engine(tiny_paths, owner="router-a")
    other = make_tiny_model(tmp_path / "other", seed=7)
    try:
        with pytest.raises(ValueError, match="ray.shared_pools: pool 'target:t'"):
            shared_engine(tiny_paths, owner="router-b", target_path=other)
    finally:
        first.shutdown()


def test_pools_down_ends_every_shared_actor(cluster, tiny_paths):
    import ray

    eng = shared_engine(tiny_paths, owner="router-a")
    names = [m.name for m in eng.draft_pool.members + eng.targets["t"].members]
    handle = eng.targets["t"].members[0].handle
    assert ray.get(control_call(handle, "ping"))
    assert pools_down() == {"draft": 1, "target:t": 1}
    assert all(gone(name) for name in [*names, DIRECTORY_NAME])
