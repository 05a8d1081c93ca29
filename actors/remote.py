"""Ray plumbing for one request's calls: starting and stopping Ray, and the SideHandle over
an actor (actors/speculative.py) whose waits are bounded.

A call waiting on an actor keeps checking its request (client gone, deadline passed: the
actor is told to drop the request's work) and its actor's health (a replica the heartbeat
found hung fails the call at once), so no call waits without a bound.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from tandem.actors.speculative import RequestStateLostError, SideUnavailableError
from tandem.actors.tracing import TRACED_METHODS, Traced

ACTOR_ERRORS: tuple[type[BaseException], ...] = ()

# Heartbeats and cancels run in a thread group of their own on every pool actor, so an actor
# whose call threads all wait on queued model work still answers them: a ping that times
# out means a stopped process, not a busy one, and a cancel reaches the work it stops.
# Measured (bench/pressure_check.py, its control): 64 long requests at once on one target
# actor (max_concurrency 64) left no thread for the heartbeat; the replica was killed as
# hung and all 64 streams failed. Calling a group the actor did not declare kills the
# actor, so every pool actor is made by actor_class.
CONTROL_GROUP = "control"
CONTROL_THREADS = 2


def actor_class(cls):
    """`ray.remote(cls)` with the control group declared (see CONTROL_GROUP)."""
    import ray

    return ray.remote(concurrency_groups={CONTROL_GROUP: CONTROL_THREADS})(cls)


def control_call(handle, method: str, *args):
    """An actor call answered in the control group (ping, cancel): an ObjectRef."""
    return getattr(handle, method).options(concurrency_group=CONTROL_GROUP).remote(*args)


def _actor_errors() -> tuple[type[BaseException], ...]:
    global ACTOR_ERRORS
    if not ACTOR_ERRORS:
        from ray import exceptions as rex

        names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "WorkerCrashedError")
        ACTOR_ERRORS = tuple(getattr(rex, n) for n in names if hasattr(rex, n))
    return ACTOR_ERRORS


def join_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else RAY_ADDRESS (what `ray job submit` sets for a
    job's driver), else None (start an embedded local Ray)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(*, address: str | None, num_cpus: int | None = None, resources: dict | None = None, namespace: str = "tandem") -> bool:
    """Join the cluster `join_address(address)` names, or start an embedded local Ray shaped
    by num_cpus and resources (Ray refuses those when connecting). True when this call started
    an embedded Ray (then `stop_ray(embedded=True)` ends its processes)."""
    import ray

    if ray.is_initialized():
        return False
    address = join_address(address)
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
        return False
    ray.init(
        address="local",  # a new Ray, even where `ray start` left /tmp/ray/ray_current_cluster behind
        num_cpus=num_cpus,
        resources=resources or {},
        namespace=namespace,
        include_dashboard=False,
        log_to_driver=False,
    )
    return True


def stop_ray(*, embedded: bool, grace_s: float = 5.0) -> int:
    """Disconnect from Ray. For a Ray this process started, also end every process it
    spawned (raylet, GCS, workers, and the dashboard and runtime-env agents, which otherwise
    outlive ray.shutdown() by 30-60 s): they are given `grace_s`, then terminated, then
    killed. Returns how many had to be ended by force."""
    import psutil
    import ray

    spawned = psutil.Process().children(recursive=True) if embedded else []
    ray.shutdown()
    _, alive = psutil.wait_procs(spawned, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, still = psutil.wait_procs(alive, timeout=3.0)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(still, timeout=3.0)
    return len(alive)


POLL_S = 0.1  # how often a waiting call checks its request's stop reason and its actor's health
CANCEL_GRACE_S = 30.0  # after a cancel, how long an actor may take to drop the work
MAX_CALL_S = 600.0  # the longest one actor call may run for a request without a deadline


@dataclass
class CallWatch:
    """What a call waiting on an actor keeps checking: its request's stop reason (client
    gone, deadline, stop string: then the actor is told to drop the request's work) and its
    actor's health (a hung actor fails the call at once). Every call thus ends within the
    request's deadline plus CANCEL_GRACE_S, or MAX_CALL_S without a deadline."""

    key: str  # the request's state key on the actors
    should_stop: Callable[[], str | None] | None = None
    max_call_s: float = MAX_CALL_S


class _RayFuture:
    """One actor call's answer: `result()` waits on this thread, `wait()` on the event loop
    (actors/steps.py); both keep checking the call's watch while they wait. A call sent in a
    group (_Coalescer) has no ref of its own, only `slot`: the event-loop future its answer
    (or its failure, or the group's) is set on."""

    def __init__(self, ref, side: "RaySide", slot=None):
        self.ref = ref
        self.slot = slot
        self.side = side
        self._started = time.monotonic()
        self._cancelled_at: float | None = None

    def result(self):
        import ray
        from ray.exceptions import GetTimeoutError

        while True:
            try:
                return self.side.unwrap(ray.get(self.ref, timeout=POLL_S))  # one round trip when the answer is quick
            except GetTimeoutError:
                pass
            except _actor_errors() + (RequestStateLostError,) as exc:
                # a dead actor, or a restarted one that lost the request: the side is gone
                self._fail(type(exc).__name__, cause=exc)
            self._check()

    async def wait(self):
        import asyncio

        answer = self.slot if self.slot is not None else asyncio.wrap_future(self.ref.future())  # no thread: Ray completes it
        try:
            while True:
                done, _ = await asyncio.wait({answer}, timeout=POLL_S)
                if done:
                    try:
                        return self.side.unwrap(answer.result())
                    except _actor_errors() + (RequestStateLostError,) as exc:
                        self._fail(type(exc).__name__, cause=exc)
                self._check()
        finally:
            answer.cancel()  # a call given up on (failed, cancelled): its late answer is not wanted

    def _check(self) -> None:
        """Between polls: a hung actor fails the call; a stopped request is cancelled on the
        actor (fire and forget), which gets CANCEL_GRACE_S to drop it; no call outlives
        its watch's max_call_s."""
        side, watch = self.side, self.side.watch
        now = time.monotonic()
        if side.member is not None and side.member.hung:
            self._fail("stopped answering its heartbeat")
        if self._cancelled_at is None and watch.should_stop is not None and watch.should_stop():
            self._cancelled_at = now
            control_call(side.handle, "cancel", watch.key)  # fire and forget: the actor drops the work
        if self._cancelled_at is not None and now - self._cancelled_at > CANCEL_GRACE_S:
            self._fail(f"did not drop a cancelled request within {CANCEL_GRACE_S:.0f}s")
        if now - self._started > watch.max_call_s:
            self._fail(f"gave no answer within {watch.max_call_s:.0f}s")

    def _fail(self, why: str, cause: BaseException | None = None):
        self.side.failed_once()
        raise SideUnavailableError(f"{self.side.role} actor failed: {why}", role=self.side.role) from cause


class RaySide:
    """A SideHandle over a Ray actor (see actors/speculative.py).

    tracing: for a traced request, an object with `carrier` (its W3C trace context, a dict)
    and `record(spans)`: the calls in TRACED_METHODS then carry `trace=carrier`, and the span
    records the actor answers with go to `record` (actors/tracing.py)."""

    def __init__(
        self,
        handle,
        *,
        role: str,
        on_failure: Callable[[], None] | None = None,
        watch: CallWatch | None = None,
        member: Any = None,
        tracing: Any = None,
    ):
        self.handle = handle
        self.role = role
        self._on_failure = on_failure
        self.watch = watch or CallWatch(key="")
        self.member = member  # the replica (its `hung` flag is read while waiting)
        self.failed = False
        self.tracing = tracing

    def failed_once(self) -> None:
        if not self.failed:  # one failure per request, however many calls notice it
            self.failed = True
            if self._on_failure is not None:
                self._on_failure()

    def call(self, method: str, /, *args, **kwargs):
        if self.tracing is not None and method in TRACED_METHODS:
            kwargs["trace"] = self.tracing.carrier
        if method == "verify" and self.role == "target" and coalescing():
            loop = _running_loop()
            if loop is not None:  # on the router's event loop: sent with its neighbours
                return _RayFuture(None, self, slot=_Coalescer.of(self.handle, loop).add(*args, **kwargs))
        ref = getattr(self.handle, method).remote(*args, **kwargs)
        return _CloseFuture(ref) if method == "close" else _RayFuture(ref, self)

    def unwrap(self, answer: Any) -> Any:
        """A traced call's value, its span records handed to `tracing.record`."""
        if isinstance(answer, Traced):
            if self.tracing is not None:
                self.tracing.record(answer.spans)
            return answer.value
        return answer


def coalescing() -> bool:
    """Whether the router sends a target's verify calls in groups (_Coalescer): on unless
    TANDEM_COALESCE=0 (for comparisons)."""
    return os.environ.get("TANDEM_COALESCE", "1").strip().lower() not in ("0", "false", "no", "off")


def _running_loop():
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Coalescer:
    """The verify calls made for one target actor in one pass of the event loop, sent as one
    `verify_many` call at the end of that pass (TargetWorker.verify_many), each answered in
    its own slot.

    Why: with many requests in flight, the answers of one batched forward come back together,
    and each request sends its next step in the same pass; one Ray call per request costs
    the router and the actor ~0.5 ms of CPU each (measured on the 2-core host: 8 calls a
    step 0.55 + 0.47 ms per token, one call of 8 0.12 + 0.09 ms), on the cores the forward
    runs on. A request alone sends a group of one: the same call as before.

    One per (actor handle, event loop); a request has one verify in flight at a time, so a
    group never holds two of one request."""

    _all: dict[tuple[int, int], "_Coalescer"] = {}

    def __init__(self, handle, loop):
        self.handle = handle  # kept: the key's id() stays this handle's while it lives
        self.loop = loop
        self.pending: list[tuple[tuple, Any]] = []

    @classmethod
    def of(cls, handle, loop) -> "_Coalescer":
        key = (id(handle), id(loop))
        c = cls._all.get(key)
        if c is None or c.handle is not handle or c.loop is not loop:
            for k in [k for k, v in cls._all.items() if v.loop.is_closed()]:
                del cls._all[k]  # loops that ended (asyncio.run in a script, say)
            c = cls._all[key] = cls(handle, loop)
        return c

    def add(self, request_id, block, *, bonus: bool = True, trace: dict | None = None):
        slot = self.loop.create_future()
        if not self.pending:
            self.loop.call_soon(self._send)
        self.pending.append(((request_id, block, bool(bonus), trace), slot))
        return slot

    def _send(self) -> None:
        import asyncio

        calls, self.pending = self.pending, []
        try:
            answer = asyncio.wrap_future(self.handle.verify_many.remote([c for c, _ in calls]).future())
        except Exception as exc:  # noqa: BLE001 - the submit itself failed: every call fails with it
            self._settle(calls, error=exc)
            return
        answer.add_done_callback(lambda f: self._settle(calls, answer=f))

    @staticmethod
    def _settle(calls, *, answer=None, error: BaseException | None = None) -> None:
        values = None
        if error is None:
            if answer.cancelled():
                error = RuntimeError("the grouped verify call was cancelled")
            else:
                error = answer.exception()
                values = answer.result() if error is None else None
        for i, (_, slot) in enumerate(calls):
            if slot.done():  # its waiter gave up (failed, cancelled)
                continue
            value = values[i] if values is not None else error
            if isinstance(value, BaseException):
                slot.set_exception(value)
            else:
                slot.set_result(value)


CLOSE_WAIT_S = 5.0


class _CloseFuture:
    """Freeing a request never blocks for long, nor marks an actor failed: a dead or
    restarting actor holds nothing of the request anyway."""

    def __init__(self, ref):
        self.ref = ref

    def result(self):
        import ray

        return ray.get(self.ref, timeout=CLOSE_WAIT_S)

    async def wait(self):
        import asyncio

        return await asyncio.wait_for(asyncio.wrap_future(self.ref.future()), CLOSE_WAIT_S)


