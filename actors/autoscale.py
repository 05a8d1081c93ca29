"""Pools that follow traffic: each scaled pool grows and shrinks a replica at a time between
its bounds, from one live signal, its demand = requests in flight on its replicas + requests
queued for it (the router's queue).

The rule is Ray Serve's request-based one: desired replicas = ceil(demand /
target_ongoing_requests), clamped to [min_replicas, max_replicas]. A pool scales up once
the desired count has stayed above its size for upscale_delay_s, and down once it has stayed
below for downscale_delay_s (longer: a burst should not churn replicas, whose start loads a
model). Why not Ray Serve's autoscaler itself: it scales Serve deployments, whose requests go
through Serve's own router and handles; tandem's pools are plain actors called directly by
its router (PEARL overlaps a draft call and a verify call per round), so only the rule is
reused, in the ~150 lines below.

Scale-up reserves a new placement group: on a Ray cluster with an autoscaler (KubeRay) a
pending group is what brings a node of the matching worker group. A replica that gets no
room within the pool's load timeout is given up (logged) and retried after the delay.
Scale-down drains: the chosen replica takes no new request, its streams finish, then its
actors end and its room is freed; no stream fails because of a scale-down.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("tandem.autoscale")


@dataclass(frozen=True)
class ScalePolicy:
    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    load_timeout_s: float = 600.0  # room and model loading for one new replica

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")

    def desired(self, demand: float) -> int:
        return max(self.min_replicas, min(self.max_replicas, math.ceil(demand / self.target_ongoing_requests)))


@dataclass(frozen=True)
class ScaleEvent:
    """up / down: a replica joined / left the rotation; up_failed: no room or load failure;
    drain: a replica stopped taking requests (it leaves when its streams end)."""

    pool: str
    kind: str
    replicas: int  # serving replicas after the event
    demand: float
    at: float = field(default_factory=time.time)
    detail: str = ""


@dataclass
class _Scaled:
    name: str
    pool: Any  # actors.pools._Pool
    policy: ScalePolicy
    queued: Callable[[], int] | None
    above_since: float | None = None
    below_since: float | None = None
    adding: bool = False


class PoolAutoscaler:
    """One thread that looks at every scaled pool each `interval_s` and starts additions and
    drains on worker threads (a replica's start takes as long as its model load)."""

    def __init__(self, *, interval_s: float = 1.0, on_event: Callable[[ScaleEvent], None] | None = None):
        self.interval_s = interval_s
        self.on_event = on_event
        self.events: list[ScaleEvent] = []
        self._pools: list[_Scaled] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, name: str, pool: Any, policy: ScalePolicy, *, queued: Callable[[], int] | None = None) -> None:
        self._pools.append(_Scaled(name=name, pool=pool, policy=policy, queued=queued))

    def start(self) -> PoolAutoscaler:
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5.0)

    def replicas(self) -> dict[str, int]:
        """Serving replicas per scaled pool."""
        return {s.name: s.pool.size for s in self._pools}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for s in self._pools:
                try:
                    self.step(s, time.monotonic())
                except Exception:  # noqa: BLE001 - one bad look never stops scaling
                    log.exception("autoscaler step for %s failed", s.name)

    def demand(self, s: _Scaled) -> float:
        queued = 0
        if s.queued is not None:
            try:
                queued = int(s.queued())
            except Exception:  # noqa: BLE001 - a broken signal counts as no queue
                log.exception("queue signal of %s failed", s.name)
        return float(s.pool.load() + queued)

    def step(self, s: _Scaled, now: float) -> None:
        if not s.pool.may_scale():  # a shared pool another router scales (actors/directory.py)
            s.above_since = s.below_since = None
            return
        demand = self.demand(s)
        size = s.pool.size + (1 if s.adding else 0)
        desired = s.policy.desired(demand)
        s.above_since = (s.above_since or now) if desired > size else None
        s.below_since = (s.below_since or now) if desired < size else None
        if s.above_since is not None and now - s.above_since >= s.policy.upscale_delay_s and not s.adding:
            s.adding, s.above_since = True, None
            threading.Thread(target=self._add, args=(s, demand), name=f"scale-up-{s.name}", daemon=True).start()
        elif s.below_since is not None and now - s.below_since >= s.policy.downscale_delay_s and not s.adding:
            s.below_since = None
            member = s.pool.start_draining()
            if member is not None:
                self._emit(ScaleEvent(s.name, "drain", s.pool.size, demand))
                threading.Thread(target=self._retire, args=(s, member, demand), name=f"scale-down-{s.name}", daemon=True).start()

    def _add(self, s: _Scaled, demand: float) -> None:
        try:
            s.pool.add_replica(timeout_s=s.policy.load_timeout_s)
            self._emit(ScaleEvent(s.name, "up", s.pool.size, demand))
        except Exception as exc:  # noqa: BLE001 - no room, or the load failed: retried later
            self._emit(ScaleEvent(s.name, "up_failed", s.pool.size, demand, detail=str(exc)[:300]))
        finally:
            s.adding = False

    def _retire(self, s: _Scaled, member: Any, demand: float) -> None:
        while not s.pool.idle(member) and not self._stop.is_set():
            time.sleep(0.1)
        s.pool.retire(member)
        self._emit(ScaleEvent(s.name, "down", s.pool.size, demand))

    def _emit(self, event: ScaleEvent) -> None:
        with self._lock:
            self.events.append(event)
        log.log(logging.WARNING if event.kind == "up_failed" else logging.INFO,
                "pool %s: scale %s -> %d replicas (demand %.1f)%s", event.pool, event.kind, event.replicas,
                event.demand, f": {event.detail}" if event.detail else "")
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001
                log.exception("scale event callback failed")
