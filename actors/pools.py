"""Ray pools: a shared draft pool and one target pool per target, placed on distinct Ray
resources through placement groups; their replicas can be added and drained while requests
run. The engine that runs requests across them is actors/engine.py.

Placement: every replica reserves a placement group, one bundle per actor (so a pool can
grow and shrink a replica at a time: actors/autoscale.py). On a CPU box the bundles ask for
custom resources (`draft_pool`, `target_pool`) that the embedded Ray advertises; on a
cluster they ask for GPUs and an accelerator type, and the Ray autoscaler (KubeRay) adds
nodes of the matching worker group. A sharded target replica is a pipeline of TargetShard
actors (each in its own bundle) behind a light TargetWorker front.

A replica record (_Member) carries what the engine's failover, the heartbeat
(actors/health.py) and scaling read and mark: requests in flight, failures, hung, draining,
retired.

A pool given a SharedPool (actors/directory.py) is shared by several routers: its actors and
placement groups are detached and named, listed in the cluster's pool directory, attached to
by the routers that start after the first, and left running when a router exits.

Why past ~400 lines: the replica record, the least-loaded choice, the pools and the Ray
plumbing that starts their actors change together; what sharing adds lives in
actors/directory.py.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tandem.actors.directory import Shareable, SharedPool, attach_or_create
from tandem.actors.prefix_cache import PREFIX_CACHE_BYTES
from tandem.actors.remote import actor_class
from tandem.actors.workers import DraftWorker, ModelLoad, TargetWorker

log = logging.getLogger("tandem.pools")
DRAFT_POOL = "draft"  # the draft pool's name in scaling policies and events


@dataclass(frozen=True)
class Placement:
    """Ray resources of one actor of a pool."""

    resources: dict = field(default_factory=dict)
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    accelerator_type: str | None = None

    def bundle(self) -> dict[str, float]:
        b = {k: float(v) for k, v in self.resources.items() if v}
        if self.num_cpus:
            b["CPU"] = float(self.num_cpus)
        if self.num_gpus:
            b["GPU"] = float(self.num_gpus)
        if self.accelerator_type:
            b[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return b or {"CPU": 0.001}  # a bundle cannot be empty

    def ray_options(self) -> dict[str, Any]:
        """The resource options of `ray.remote(...).options()` for one actor of the pool."""
        opts: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "resources": {k: float(v) for k, v in self.resources.items() if v},
        }
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts


@dataclass(frozen=True)
class DraftPoolSpec:
    load: ModelLoad
    replicas: int = 1
    threads: int | None = 1  # torch threads per actor; None: the cores of its node
    placement: Placement = field(default_factory=lambda: Placement(resources={"draft_pool": 1}))
    kv_budget_bytes: int | None = None  # KV cache per actor; None: from its free memory


@dataclass(frozen=True)
class TargetSpec:
    name: str
    load: ModelLoad
    replicas: int = 1
    shards: int = 1
    threads: int | None = 1  # torch threads per actor (each shard); None: the cores of its node
    placement: Placement = field(default_factory=lambda: Placement(resources={"target_pool": 1}))
    max_restarts: int = -1  # Ray restarts a dead target actor (its requests are lost)
    kv_budget_bytes: int | None = None  # KV cache per actor (each shard); None: from its free memory
    prefix_cache_bytes: int = PREFIX_CACHE_BYTES  # shared prompt prefixes' KV per actor (unsharded); 0: none


# ---------------------------------------------------------------------------------------
# Ray plumbing
# ---------------------------------------------------------------------------------------


def pool_resources(draft: DraftPoolSpec | None, targets: Sequence[TargetSpec]) -> dict[str, float]:
    """Custom resources an embedded Ray must advertise for these pools."""
    need: dict[str, float] = {}
    actors = [(draft.placement, draft.replicas)] if draft else []
    actors += [(t.placement, t.replicas * t.shards) for t in targets]
    for placement, count in actors:
        for k, v in placement.resources.items():
            need[k] = need.get(k, 0.0) + float(v) * count
    return need


def _remote(cls, *, placement: Placement, pg, index: int, name: str | None = None, restarts: int = -1):
    """Options for one pool actor; a named one (a shared pool's) is also detached."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts: dict[str, Any] = {
        **placement.ray_options(),
        "max_restarts": restarts,
        "max_task_retries": 0,
        "max_concurrency": 64,
        # Ray records every actor call as a task event in the GCS: tens of thousands of
        # draft/verify calls a minute filled it by 320 MB in a 30-minute soak. tandem's own
        # telemetry covers these calls, so they are not reported.
        "enable_task_events": False,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index),
    }
    if name:
        # Ray warns that a restartable detached actor in a placement group cannot restart once
        # its group is removed: a shared pool removes a replica's group only when it retires the
        # replica, after ending its actors on purpose (_shutdown), so the warning does not apply.
        opts.update(name=name, lifetime="detached")
    return actor_class(cls).options(**opts)


def _placement_group(placement: Placement, count: int, *, timeout_s: float, what: str, name: str | None = None):
    import ray
    from ray.util.placement_group import placement_group

    # a named group (a shared pool's) is detached: it outlives the router that made it
    pg = placement_group([placement.bundle() for _ in range(count)], strategy="PACK", name=name or "",
                         lifetime="detached" if name else None)
    if not pg.wait(timeout_seconds=timeout_s):
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"{what}: no room for {count} actor(s) with {placement.bundle()} within {timeout_s:.0f}s; "
            f"cluster resources: {ray.available_resources()}"
        )
    return pg


# ---------------------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------------------


FAILED_COOLDOWN_S = 30.0  # a failed replica is skipped this long (Ray may restart it meanwhile)


@dataclass
class _Member:
    handle: Any
    inflight: int = 0
    failures: int = 0
    failed_at: float = 0.0
    shards: list = field(default_factory=list)
    hung: bool = False  # missed its last heartbeat (HealthMonitor)
    replaced_at: float = 0.0  # when the monitor last killed it for Ray to restart
    pg: Any = None  # its placement group (one bundle per actor)
    draining: bool = False  # scale-down: takes no new request, retires when idle
    retired: bool = False  # scaled down: actors ended, slot reusable
    name: str | None = None  # a shared pool's: the front actor's name (shards: name-s<i>)
    shard_names: tuple = ()
    pg_name: str | None = None
    draining_since: float = 0.0

    @property
    def serving(self) -> bool:
        """May take a new request (the pool's choice also prefers healthy ones)."""
        return not (self.draining or self.retired)

    @property
    def healthy(self) -> bool:
        if self.hung:
            return False
        return time.monotonic() - self.failed_at > FAILED_COOLDOWN_S if self.failures else True

    def mark_failed(self) -> None:
        self.failures += 1
        self.failed_at = time.monotonic()

    def restore(self) -> None:
        """It answered a heartbeat after a failure: back in the rotation before the cooldown."""
        self.hung = False
        self.failures = 0


class _LeastLoaded:
    """Least-loaded choice among healthy members, counting requests in flight."""

    def __init__(self, members: list[_Member]):
        self.members = members
        self._lock = threading.Lock()

    def acquire(self, exclude: set[int] = frozenset(), *, healthy_only: bool = False) -> tuple[int, _Member] | None:
        with self._lock:
            serving = [(i, m) for i, m in enumerate(self.members) if m.serving and i not in exclude]
            choices = [(m.inflight, i) for i, m in serving if m.healthy]
            if not choices and not healthy_only:
                choices = [(m.inflight, i) for i, m in serving]
            if not choices:
                return None
            _, i = min(choices)
            self.members[i].inflight += 1
            return i, self.members[i]

    def release(self, i: int) -> None:
        with self._lock:
            self.members[i].inflight -= 1

    def load(self) -> int:
        return sum(m.inflight for m in self.members)

    def start_draining(self) -> _Member | None:
        """Scale-down: a serving replica stops taking new ones (a failed or hung one first,
        then the one with the fewest requests in flight, the newest on a tie); None when
        only one serves."""
        with self._lock:
            serving = [(m.healthy, m.inflight, -i, m) for i, m in enumerate(self.members) if m.serving]
            if len(serving) < 2:
                return None
            member = min(serving, key=lambda x: x[:3])[3]
            member.draining = True
            member.draining_since = time.monotonic()
            return member

    def place(self, member: _Member) -> int:
        """Put a new replica in a retired slot nobody holds (a shared pool's replica retired
        by another router may still have this router's requests ending on it) or at the end."""
        with self._lock:
            for i, m in enumerate(self.members):
                if m.retired and m.inflight == 0:
                    self.members[i] = member
                    return i
            self.members.append(member)
            return len(self.members) - 1


class _Pool(Shareable):
    """Replicas of one model behind a least-loaded choice; they can be added and drained
    while requests run (actors/autoscale.py decides when)."""

    what = "pool"
    members: list[_Member]
    chooser: _LeastLoaded
    shared: SharedPool | None = None

    member_type = _Member

    @staticmethod
    def end(members: list[_Member]) -> None:
        _shutdown(members)

    def _launch(self, *, timeout_s: float) -> _Member:
        """Reserve room for one replica and start its actors (not waiting for them to load)."""
        raise NotImplementedError

    def _start(self, count: int, *, timeout_s: float) -> None:
        """The pool's first `count` replicas, loading side by side (a shared pool: the ones
        the directory lists, or these when this router creates it); `info` is the first's."""
        import ray

        if self.shared is not None:
            members, created = attach_or_create(self, self.shared, self.spec, count, timeout_s=timeout_s)
            log.info("%s: %s shared pool %s (%d replicas)", self.what, "created" if created else "attached to",
                     self.shared.key, len(members))
        else:
            members = self.launch_loaded(count, timeout_s=timeout_s)
        self.members = members
        self.chooser = _LeastLoaded(members)
        self.info = ray.get(members[0].handle.info.remote(), timeout=timeout_s)

    def launch_loaded(self, count: int, *, timeout_s: float) -> list[_Member]:
        """Start `count` replicas side by side and wait for their models (ended on failure)."""
        import ray

        members: list[_Member] = []
        try:
            for _ in range(count):
                members.append(self._launch(timeout_s=timeout_s))
            ray.get([m.handle.info.remote() for m in members], timeout=timeout_s)
        except BaseException:
            _shutdown(members)
            raise
        return members

    def _names(self) -> tuple[str | None, str | None]:
        """(actor name, placement group name) for a new replica: named only when shared."""
        if self.shared is None:
            return None, None
        name = self.shared.actor_name()
        return name, f"{name}-pg"

    @property
    def size(self) -> int:
        """Replicas taking requests (draining and retired ones aside)."""
        return sum(1 for m in self.members if m.serving)

    def load(self) -> int:
        """Requests in flight on the pool's replicas (a shared pool: every router's, as its
        actors hold them; this router's count where an actor does not answer)."""
        return self.chooser.load() if self.shared is None else self.shared_load()

    def add_replica(self, *, timeout_s: float) -> int:
        """Start one more replica and put it in rotation once loaded; its index. Raises
        RuntimeError when the cluster has no room for it within timeout_s (the Ray
        autoscaler adds nodes for the pending placement group meanwhile)."""
        import ray

        member = self._launch(timeout_s=timeout_s)
        try:
            ray.get(member.handle.info.remote(), timeout=timeout_s)
            if self.shared is not None:
                self.shared.call("add", self.shared.key, self.record(member))
        except BaseException:
            _shutdown([member])
            raise
        return self.chooser.place(member)

    def start_draining(self) -> _Member | None:
        member = self.chooser.start_draining()
        if member is not None and self.shared is not None:
            self.shared.call("mark_draining", self.shared.key, member.name)
        return member

    def retire(self, member: _Member) -> None:
        """End a drained replica's actors and free its room."""
        if self.shared is not None:
            self.shared.call("remove", self.shared.key, member.name)
        _shutdown([member])
        member.retired = True

    def acquire(self, exclude: set[int] = frozenset(), *, healthy_only: bool = False):
        return self.chooser.acquire(exclude, healthy_only=healthy_only)

    def release(self, i: int) -> None:
        self.chooser.release(i)

    def mark_failed(self, i: int) -> None:
        self.members[i].mark_failed()

    @property
    def healthy(self) -> bool:
        """Some replica can take a request now."""
        return any(m.healthy and m.serving for m in self.members)

    def handles(self) -> list:
        return [m.handle for m in self.members if not m.retired]

    def shutdown(self) -> None:
        """End the pool's actors; a shared pool's stay for the other routers (detached)."""
        if self.shared is not None:
            log.info("%s: leaving shared pool %s running (tandem pools-down ends it)", self.what, self.shared.key)
            try:  # another router takes over its scaling now, not when the lease lapses
                self.shared.call("release", f"scale:{self.shared.key}", self.shared.owner, timeout_s=5.0)
            except Exception:  # noqa: BLE001 - the directory is gone: nothing to hand over
                pass
            return
        _shutdown([m for m in self.members if not m.retired])


class DraftPool(_Pool):
    """The shared draft pool: replicas of one (multi-exit) draft, each drafting for any target."""

    what = "draft pool"

    def __init__(self, spec: DraftPoolSpec, *, timeout_s: float = 300.0, shared: SharedPool | None = None):
        self.spec = spec
        self.shared = shared
        self._start(spec.replicas, timeout_s=timeout_s)

    def _launch(self, *, timeout_s: float) -> _Member:
        spec = self.spec
        name, pg_name = self._names()
        pg = _placement_group(spec.placement, 1, timeout_s=timeout_s, what=self.what, name=pg_name)
        cls = _remote(DraftWorker, placement=spec.placement, pg=pg, index=0, name=name)
        return _Member(handle=cls.remote(spec.load, threads=spec.threads, kv_budget_bytes=spec.kv_budget_bytes), pg=pg,
                       name=name, pg_name=pg_name)


def _shutdown(members: list[_Member]) -> None:
    import ray

    for m in members:
        for h in [m.handle, *m.shards]:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if m.pg is not None:
            try:
                ray.util.remove_placement_group(m.pg)
            except Exception:  # noqa: BLE001
                pass


class TargetPool(_Pool):
    """Replicas of one target; each replica is one TargetWorker, or a TargetWorker front
    over `shards` TargetShard pipeline stages."""

    def __init__(self, spec: TargetSpec, *, timeout_s: float = 300.0, shared: SharedPool | None = None):
        self.spec = spec
        self.what = f"target {spec.name!r}"
        self.shared = shared
        self._start(spec.replicas, timeout_s=timeout_s)

    def _launch(self, *, timeout_s: float) -> _Member:
        from tandem.actors.pipeline import TargetShard

        spec = self.spec
        name, pg_name = self._names()
        pg = _placement_group(spec.placement, spec.shards, timeout_s=timeout_s, what=self.what, name=pg_name)
        if spec.shards == 1:
            cls = _remote(TargetWorker, placement=spec.placement, pg=pg, index=0, restarts=spec.max_restarts, name=name)
            return _Member(handle=cls.remote(spec.load, threads=spec.threads, kv_budget_bytes=spec.kv_budget_bytes,
                                             prefix_cache_bytes=spec.prefix_cache_bytes), pg=pg,
                           name=name, pg_name=pg_name)
        stages = []
        shard_names = tuple(f"{name}-s{i}" for i in range(spec.shards)) if name else ()
        for index in range(spec.shards):
            cls = _remote(TargetShard, placement=spec.placement, pg=pg, index=index, restarts=spec.max_restarts,
                          name=shard_names[index] if name else None)
            stages.append(
                cls.remote(
                    spec.load.path,
                    stage=(index, spec.shards),
                    dtype=spec.load.dtype,
                    device=spec.load.device,
                    threads=spec.threads,
                    resolve=spec.load.resolve,
                    kv_budget_bytes=spec.kv_budget_bytes,
                )
            )
        # the front holds no model: request state and verification only; restartable like
        # the stages (it is rebuilt over the same stage handles)
        front = actor_class(TargetWorker).options(
            num_cpus=0, max_restarts=spec.max_restarts, max_concurrency=64, enable_task_events=False,
            **({"name": name, "lifetime": "detached"} if name else {}),
        )
        return _Member(handle=front.remote(None, threads=1, stages=stages), shards=stages, pg=pg,
                       name=name, shard_names=shard_names, pg_name=pg_name)
