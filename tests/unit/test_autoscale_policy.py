"""actors/autoscale.py's rule on a fake pool (the real pools: tests/actors/test_autoscale.py):
desired = ceil(demand / target), within bounds; a replica is added only after the demand
stayed high for the up delay, drained only after it stayed low for the down delay (a
short burst or lull changes nothing), and a drained replica ends only when idle."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from tandem.actors.autoscale import PoolAutoscaler, ScalePolicy


@dataclass
class FakeMember:
    inflight: int = 0
    draining: bool = False
    retired: bool = False


@dataclass
class FakePool:
    members: list = field(default_factory=lambda: [FakeMember()])
    inflight: int = 0
    added: threading.Event = field(default_factory=threading.Event)
    lease: bool = True  # a shared pool: whether this router holds its scaling lease

    def may_scale(self):
        return self.lease

    def idle(self, m):
        return m.inflight == 0

    @property
    def size(self):
        return sum(1 for m in self.members if not (m.draining or m.retired))

    def load(self):
        return self.inflight

    def add_replica(self, *, timeout_s):
        self.members.append(FakeMember())
        self.added.set()

    def start_draining(self):
        serving = [m for m in self.members if not (m.draining or m.retired)]
        if len(serving) < 2:
            return None
        serving[-1].draining = True
        return serving[-1]

    def retire(self, m):
        m.retired = True


def test_desired_replicas_rule_and_bounds():
    p = ScalePolicy(min_replicas=1, max_replicas=4, target_ongoing_requests=2.0)
    assert [p.desired(d) for d in (0, 1, 2, 3, 4, 5, 8, 100)] == [1, 1, 1, 2, 2, 3, 4, 4]
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        ScalePolicy(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        ScalePolicy(min_replicas=1, max_replicas=2, target_ongoing_requests=0)


def wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_up_only_after_the_delay_down_only_after_the_delay_and_drain_waits_for_idle():
    pool = FakePool()
    scaler = PoolAutoscaler(interval_s=1.0)
    scaler.add("t", pool, ScalePolicy(min_replicas=1, max_replicas=3, target_ongoing_requests=2.0,
                                      upscale_delay_s=5.0, downscale_delay_s=20.0))
    s = scaler._pools[0]
    pool.inflight = 5  # wants 3
    scaler.step(s, now=100.0)
    scaler.step(s, now=104.9)
    assert not pool.added.is_set()  # a burst shorter than the delay adds nothing
    pool.inflight = 0
    scaler.step(s, now=105.0)  # the burst ended: the clock restarts
    pool.inflight = 5
    scaler.step(s, now=106.0)
    scaler.step(s, now=110.9)
    assert not pool.added.is_set()
    scaler.step(s, now=111.0)
    assert wait(pool.added.is_set) and wait(lambda: not s.adding)
    assert pool.size == 2 and [e.kind for e in scaler.events] == ["up"]
    # one replica per delay: still wanting 3 with 2, the next one needs a delay of its own
    pool.added.clear()
    scaler.step(s, now=111.1)
    assert not pool.added.is_set()
    scaler.step(s, now=116.1)
    assert wait(pool.added.is_set) and wait(lambda: not s.adding) and pool.size == 3

    # demand falls: nothing before the down delay, then one drain; the drained replica is
    # busy, so it retires only when its stream ends
    pool.inflight = 1
    pool.members[-1].inflight = 1
    scaler.step(s, now=200.0)
    scaler.step(s, now=219.9)
    assert pool.size == 3 and not any(m.draining for m in pool.members)
    scaler.step(s, now=220.0)
    drained = pool.members[-1]
    assert drained.draining and pool.size == 2
    time.sleep(0.3)
    assert not drained.retired  # still streaming
    drained.inflight = 0
    assert wait(lambda: drained.retired)
    assert wait(lambda: [e.kind for e in scaler.events] == ["up", "up", "drain", "down"])
    scaler.stop()


def test_a_shared_pool_is_scaled_only_by_the_lease_holder():
    """Routers sharing a pool (actors/directory.py): one without the pool's scaling lease
    neither adds nor drains, however long the demand stays; it scales once it holds it."""
    pool = FakePool(lease=False)
    scaler = PoolAutoscaler(interval_s=0.01)
    scaler.add("t", pool, ScalePolicy(min_replicas=1, max_replicas=3, target_ongoing_requests=1.0,
                                      upscale_delay_s=0.0, downscale_delay_s=0.0))
    s = scaler._pools[0]
    pool.inflight = 5
    for _ in range(20):
        scaler.step(s, time.monotonic())
    assert pool.size == 1 and not pool.added.is_set() and s.above_since is None
    pool.lease = True  # control: the same demand scales once the lease is held
    scaler.step(s, time.monotonic())
    assert wait(pool.added.is_set) and pool.size == 2
