"""Faults on a real local Ray cluster: actors are killed with SIGKILL (a real crash) while
requests run.

- draft actor dies mid-request: the request finishes target-only with exactly the
  target-only greedy output (no token lost or repeated), and Ray restarts the actor so the
  pool heals and later requests speculate again;
- target actor dies before the request emitted anything: retried on a healthy replica;
- target actor dies after tokens were emitted: the request waits for the restarted actor and
  resumes where it was (prompt + sent tokens re-prefilled), with the same greedy output.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from tandem.actors.engine import ActorEngine
from tandem.actors.pools import DraftPool, DraftPoolSpec, TargetPool, TargetSpec
from tandem.actors.speculative import SpecConfig
from tandem.actors.workers import ModelLoad

PROMPT = [0, 1, 2]


def _pid(handle) -> int:
    return ray.get(handle.info.remote())["pid"]


def _wait_new_pid(handle, old: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = ray.get(handle.info.remote(), timeout=5)
            if pid != old:
                return pid
        except Exception:  # noqa: BLE001 - restarting
            pass
        time.sleep(0.2)
    raise AssertionError("the actor was not restarted")


def _wait_dead(handle, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(handle.info.remote(), timeout=2)
        except Exception:  # noqa: BLE001 - dead as expected
            return
        time.sleep(0.1)
    raise AssertionError("the actor did not die")


def _kill_at_first_tokens(pid: int, streamed: list[int]):
    """An on_tokens callback: SIGKILL `pid` when the first tokens arrive; records the stream."""

    def on_tokens(tokens):
        if not streamed:
            os.kill(pid, signal.SIGKILL)
        streamed.extend(tokens)

    return on_tokens


@pytest.fixture()
def pools(ray_local, tiny_paths):
    target_path, draft_path = tiny_paths
    made = []

    def make(*, target_replicas: int = 1, target_restarts: int = -1, shards: int = 1):
        draft = DraftPool(DraftPoolSpec(load=ModelLoad(path=draft_path, dtype="float32", exits=(2,))))
        target = TargetPool(
            TargetSpec(
                name="t",
                load=ModelLoad(path=target_path, dtype="float32"),
                replicas=target_replicas,
                shards=shards,
                max_restarts=target_restarts,
            )
        )
        eng = ActorEngine(draft, {"t": target})
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.shutdown()


@pytest.mark.parametrize("method", ["sd", "pearl"])
def test_draft_death_finishes_target_only_and_pool_heals(pools, method):
    eng = pools()
    ref = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=120).tokens
    draft = eng.draft_pool.members[0].handle
    old_pid = _pid(draft)
    streamed: list[int] = []
    out = eng.generate("t", PROMPT, spec=SpecConfig(method=method, draft_len=3), max_new_tokens=120, on_tokens=_kill_at_first_tokens(old_pid, streamed))
    assert out.draft_failed
    assert out.tokens == ref  # nothing lost, nothing repeated
    assert streamed == ref  # and the stream said exactly the same
    assert out.finish_reason == "length"

    new_pid = _wait_new_pid(draft, old_pid)
    assert new_pid != old_pid
    again = eng.generate("t", PROMPT, spec=SpecConfig(method=method, draft_len=3), max_new_tokens=40)
    assert not again.draft_failed and again.stats.drafted > 0
    assert again.tokens == ref[:40]


def test_target_death_before_output_is_retried_on_a_healthy_replica(pools):
    eng = pools(target_replicas=2, target_restarts=0)
    ref = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=30).tokens
    pool = eng.targets["t"]
    victim = pool.members[0].handle
    os.kill(_pid(victim), signal.SIGKILL)
    _wait_dead(victim)
    # both replicas idle: least-loaded picks replica 0 first, which is dead
    out = eng.generate("t", PROMPT, spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=30)
    assert out.tokens == ref
    assert pool.members[0].failures == 1
    assert not pool.members[0].healthy  # skipped for a while
    assert eng.generate("t", PROMPT, spec=SpecConfig(method="sd"), max_new_tokens=30).tokens == ref


@pytest.mark.parametrize("method", ["sd", "pearl"])
def test_target_death_mid_stream_resumes_with_the_same_output(pools, method):
    eng = pools(target_replicas=1)
    ref = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=120).tokens
    target = eng.targets["t"].members[0].handle
    pid = _pid(target)
    seen: list[int] = []

    # the only replica dies after tokens were streamed: the request waits for Ray's
    # restart, re-prefills prompt + what it sent, and goes on where it was
    out = eng.generate("t", PROMPT, spec=SpecConfig(method=method, draft_len=2), max_new_tokens=120, on_tokens=_kill_at_first_tokens(pid, seen))
    assert 0 < len(seen)
    assert out.tokens == ref and seen == ref  # nothing lost, nothing repeated
    assert out.finish_reason == "length"
    assert _pid(target) != pid  # it ran on the restarted actor


def test_a_request_waits_for_a_restarting_replica_and_gives_up_at_its_deadline(pools):
    eng = pools(target_replicas=1)
    ref = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=20).tokens
    target = eng.targets["t"].members[0].handle
    pid = _pid(target)
    os.kill(pid, signal.SIGKILL)
    _wait_dead(target)
    out = eng.generate("t", PROMPT, spec=SpecConfig(method="sd", draft_len=2), max_new_tokens=20)
    assert out.tokens == ref  # sent nothing yet: waited for the restart instead of failing
    # negative control: a request whose deadline passes while no replica is healthy ends
    # with that reason and no tokens, instead of waiting on
    eng.monitor.stop()  # nothing restores the replica meanwhile
    eng.targets["t"].members[0].mark_failed()
    eng.targets["t"].members[0].hung = True
    t0 = time.monotonic()
    stop_at = t0 + 1.0
    out = eng.generate("t", PROMPT, spec=SpecConfig(method="sd"), max_new_tokens=20, should_stop=lambda: "deadline" if time.monotonic() > stop_at else None)
    assert out.finish_reason == "deadline" and out.tokens == []
    assert time.monotonic() - t0 < 5.0


def test_a_killed_pipeline_shard_is_handled_like_a_dead_target(pools):
    eng = pools(shards=2)
    ref = eng.generate("t", PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=80).tokens
    shard = eng.targets["t"].members[0].shards[1]
    pid = _pid(shard)
    seen: list[int] = []

    # the restarted shard holds no KV: the request re-prefills there and goes on
    out = eng.generate("t", PROMPT, spec=SpecConfig(method="sd", draft_len=2), max_new_tokens=80, on_tokens=_kill_at_first_tokens(pid, seen))
    assert out.tokens == ref and seen == ref
    assert _pid(shard) != pid
