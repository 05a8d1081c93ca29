"""Heartbeats and cancels reach a busy actor (actors/remote.py, CONTROL_GROUP): with every
call thread of an actor made by actor_class waiting, a ping sent with control_call is still
answered, and so is a call that frees the waiting threads (as a cancel does). Negative
control: the same ping on the actor's call threads gets no answer while they wait."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tandem.actors.remote import actor_class, control_call


def test_a_busy_actor_answers_its_heartbeat_and_cancels(ray_local):
    import ray
    from ray.exceptions import GetTimeoutError

    # defined here so that Ray ships it by value (the tests are not importable on its workers)
    class Busy:
        def __init__(self):
            self.gate = threading.Event()
            self.waiting = 0

        def wait(self) -> bool:
            self.waiting += 1
            return self.gate.wait(60)

        def waiters(self) -> int:
            return self.waiting

        def cancel(self, _key: str) -> None:
            self.gate.set()

        def ping(self) -> int:
            return os.getpid()


    actor = actor_class(Busy).options(num_cpus=0, max_concurrency=2).remote()
    pid = ray.get(control_call(actor, "ping"), timeout=60)
    held = [actor.wait.remote() for _ in range(2)]  # every call thread now waits
    deadline = time.monotonic() + 30
    while ray.get(control_call(actor, "waiters"), timeout=10) < 2:
        assert time.monotonic() < deadline, "the waits never started"
        time.sleep(0.05)
    assert ray.get(control_call(actor, "ping"), timeout=5) == pid
    starved = actor.ping.remote()  # the control: on the call threads it waits behind them
    with pytest.raises(GetTimeoutError):
        ray.get(starved, timeout=2)
    ray.get(control_call(actor, "cancel", "any"), timeout=5)
    assert ray.get(held, timeout=30) == [True, True]
    assert ray.get(starved, timeout=30) == pid  # answered once a thread was free
    ray.kill(actor)
