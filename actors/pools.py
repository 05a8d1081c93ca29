"""Ray pools: a shared draft pool and one target pool per target, placed on distinct Ray
resources through placement groups, and the per-request loop run across them.

Placement: every pool reserves one bundle per actor in a placement group. On a CPU box the
bundles ask for custom resources (`draft_pool`, `target_pool`) that the embedded Ray
advertises; on a cluster they ask for GPUs and an accelerator type, and the Ray autoscaler
(KubeRay) adds nodes of the matching worker group. A sharded target replica is a pipeline of
TargetShard actors (each in its own bundle) behind a light TargetWorker front.

Faults:
- draft actor dies: the request finishes target-only (the loop absorbs draft failures, no
  token lost or repeated) and Ray restarts the actor (max_restarts), so the pool heals.
- target actor dies: a request that emitted nothing is retried on a healthy replica; one
  that emitted tokens ends with SideUnavailableError naming the target and the count.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from actors.speculative import GenerationResult, RequestStateLostError, SideUnavailableError, SpecConfig, run_request
from actors.workers import DraftWorker, ModelLoad, TargetWorker
from speculation.sampling import SamplingParams

ACTOR_ERRORS: tuple[type[BaseException], ...] = ()


def _actor_errors() -> tuple[type[BaseException], ...]:
    global ACTOR_ERRORS
    if not ACTOR_ERRORS:
        from ray import exceptions as rex

        names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "ActorUnschedulableError", "WorkerCrashedError")
        ACTOR_ERRORS = tuple(getattr(rex, n) for n in names if hasattr(rex, n))
    return ACTOR_ERRORS


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
    threads: int = 1
    placement: Placement = field(default_factory=lambda: Placement(resources={"draft_pool": 1}))


@dataclass(frozen=True)
class TargetSpec:
    name: str
    load: ModelLoad
    replicas: int = 1
    shards: int = 1
    threads: int = 1
    placement: Placement = field(default_factory=lambda: Placement(resources={"target_pool": 1}))
    max_restarts: int = -1  # Ray restarts a dead target actor (its requests are lost)


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


def ensure_ray(*, address: str | None, num_cpus: int | None = None, resources: dict | None = None, namespace: str = "tandem") -> None:
    """Start an embedded local Ray (address None) or join a cluster."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=namespace, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus,
            resources=resources or {},
            namespace=namespace,
            include_dashboard=False,
            log_to_driver=False,
        )


class _RayFuture:
    def __init__(self, ref, role: str, on_failure: Callable[[], None]):
        self.ref = ref
        self.role = role
        self.on_failure = on_failure

    def result(self):
        import ray

        try:
            return ray.get(self.ref)
        except _actor_errors() + (RequestStateLostError,) as exc:
            # a dead actor, or a restarted one that lost the request: the side is gone
            self.on_failure()
            raise SideUnavailableError(f"{self.role} actor failed: {type(exc).__name__}", role=self.role) from exc


class RaySide:
    """A SideHandle over a Ray actor (see actors/speculative.py)."""

    def __init__(self, handle, *, role: str, on_failure: Callable[[], None] | None = None):
        self.handle = handle
        self.role = role
        self._on_failure = on_failure
        self.failed = False

    def _failed_once(self) -> None:
        if not self.failed:  # one failure per request, however many calls notice it
            self.failed = True
            if self._on_failure is not None:
                self._on_failure()

    def call(self, method: str, /, *args, **kwargs) -> _RayFuture:
        return _RayFuture(getattr(self.handle, method).remote(*args, **kwargs), self.role, self._failed_once)


def _remote(cls, *, placement: Placement, pg, index: int, name: str | None = None, restarts: int = -1):
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts: dict[str, Any] = {
        **placement.ray_options(),
        "max_restarts": restarts,
        "max_task_retries": 0,
        "max_concurrency": 64,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index),
    }
    if name:
        opts["name"] = name
    return ray.remote(cls).options(**opts)


def _placement_group(placement: Placement, count: int, *, timeout_s: float, what: str):
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group([placement.bundle() for _ in range(count)], strategy="PACK")
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

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self.failed_at > FAILED_COOLDOWN_S if self.failures else True


class _LeastLoaded:
    """Least-loaded choice among healthy members, counting requests in flight."""

    def __init__(self, members: list[_Member]):
        self.members = members
        self._lock = threading.Lock()

    def acquire(self, exclude: set[int] = frozenset()) -> tuple[int, _Member] | None:
        with self._lock:
            choices = [(m.inflight, i) for i, m in enumerate(self.members) if m.healthy and i not in exclude]
            if not choices:
                choices = [(m.inflight, i) for i, m in enumerate(self.members) if i not in exclude]
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


class DraftPool:
    """The shared draft pool: replicas of one (multi-exit) draft, each drafting for any target."""

    def __init__(self, spec: DraftPoolSpec, *, timeout_s: float = 300.0):
        import ray

        self.spec = spec
        self.pg = _placement_group(spec.placement, spec.replicas, timeout_s=timeout_s, what="draft pool")
        handles = []
        for i in range(spec.replicas):
            cls = _remote(DraftWorker, placement=spec.placement, pg=self.pg, index=i)
            handles.append(cls.remote(spec.load, threads=spec.threads))
        self.members = [_Member(handle=h) for h in handles]
        self.chooser = _LeastLoaded(self.members)
        self.info = ray.get(handles[0].info.remote(), timeout=timeout_s)
        ray.get([h.info.remote() for h in handles[1:]], timeout=timeout_s)

    def acquire(self):
        return self.chooser.acquire()

    def release(self, i: int) -> None:
        self.chooser.release(i)

    def handles(self) -> list:
        return [m.handle for m in self.members]

    def shutdown(self) -> None:
        _shutdown(self.members, self.pg)


def _shutdown(members: list[_Member], pg) -> None:
    import ray

    for m in members:
        for h in [m.handle, *m.shards]:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
    try:
        ray.util.remove_placement_group(pg)
    except Exception:  # noqa: BLE001
        pass


class TargetPool:
    """Replicas of one target; each replica is one TargetWorker, or a TargetWorker front
    over `shards` TargetShard pipeline stages."""

    def __init__(self, spec: TargetSpec, *, timeout_s: float = 300.0):
        import ray

        from actors.pipeline import TargetShard

        self.spec = spec
        n_actors = spec.replicas * spec.shards
        self.pg = _placement_group(spec.placement, n_actors, timeout_s=timeout_s, what=f"target {spec.name!r}")
        members = []
        bundle = itertools.count()
        for _ in range(spec.replicas):
            if spec.shards == 1:
                cls = _remote(TargetWorker, placement=spec.placement, pg=self.pg, index=next(bundle), restarts=spec.max_restarts)
                members.append(_Member(handle=cls.remote(spec.load, threads=spec.threads)))
                continue
            stages = []
            for index in range(spec.shards):
                cls = _remote(TargetShard, placement=spec.placement, pg=self.pg, index=next(bundle), restarts=spec.max_restarts)
                stages.append(
                    cls.remote(
                        spec.load.path,
                        stage=(index, spec.shards),
                        dtype=spec.load.dtype,
                        threads=spec.threads,
                        resolve=spec.load.resolve,
                    )
                )
            # the front holds no model: request state and verification only
            front = ray.remote(TargetWorker).options(num_cpus=0, max_restarts=0, max_concurrency=64)
            members.append(_Member(handle=front.remote(None, threads=1, stages=stages), shards=stages))
        self.members = members
        self.chooser = _LeastLoaded(members)
        infos = ray.get([m.handle.info.remote() for m in members], timeout=timeout_s)
        self.info = infos[0]

    def acquire(self, exclude: set[int] = frozenset()):
        return self.chooser.acquire(exclude)

    def release(self, i: int) -> None:
        self.chooser.release(i)

    def mark_failed(self, i: int) -> None:
        self.members[i].failures += 1
        self.members[i].failed_at = time.monotonic()

    def handles(self) -> list:
        return [m.handle for m in self.members]

    def shutdown(self) -> None:
        _shutdown(self.members, self.pg)


# ---------------------------------------------------------------------------------------
# Generation across the pools
# ---------------------------------------------------------------------------------------


class ActorEngine:
    """Runs requests across a draft pool and target pools; handles faults as documented
    above. The router (services/) adds policy (method, exit, draft length) on top."""

    def __init__(self, draft_pool: DraftPool | None, target_pools: dict[str, TargetPool]):
        self.draft_pool = draft_pool
        self.targets = target_pools
        self._ids = itertools.count()

    def generate(
        self,
        target: str,
        prompt: Sequence[int],
        *,
        spec: SpecConfig,
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 128,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[list[int]], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
        on_round: Callable[[dict], None] | None = None,
        request_id: str | None = None,
    ) -> GenerationResult:
        if target not in self.targets:
            raise KeyError(f"target {target!r} is not served; targets: {', '.join(sorted(self.targets))}")
        pool = self.targets[target]
        sampling = sampling or SamplingParams()
        rid = request_id or f"r{next(self._ids)}-{time.monotonic_ns()}"
        tried: set[int] = set()
        while True:
            picked = pool.acquire(exclude=tried)
            if picked is None:
                raise SideUnavailableError(f"target {target!r}: no healthy replica left", role="target")
            ti, member = picked
            tried.add(ti)
            draft_pick = self.draft_pool.acquire() if (self.draft_pool and spec.method != "ar") else None
            try:
                draft_side = None
                if draft_pick is not None:
                    draft_side = RaySide(draft_pick[1].handle, role="draft")
                target_side = RaySide(member.handle, role="target", on_failure=lambda i=ti: pool.mark_failed(i))
                return run_request(
                    draft=draft_side,
                    target=target_side,
                    request_id=f"{rid}-{len(tried)}",
                    prompt=prompt,
                    sampling=sampling,
                    max_new_tokens=max_new_tokens,
                    spec=spec,
                    stop_ids=stop_ids,
                    on_tokens=on_tokens,
                    should_stop=should_stop,
                    on_round=on_round,
                )
            except SideUnavailableError as exc:
                if exc.role != "target":
                    raise
                if exc.emitted > 0:
                    raise SideUnavailableError(
                        f"target {target!r} failed after {exc.emitted} tokens were sent; the request cannot resume",
                        role="target",
                        emitted=exc.emitted,
                    ) from exc
                if len(tried) >= len(pool.members):
                    raise SideUnavailableError(f"target {target!r}: every replica failed", role="target") from exc
                # nothing emitted yet: retry on another replica
            finally:
                pool.release(ti)
                if draft_pick is not None:
                    self.draft_pool.release(draft_pick[0])

    def shutdown(self) -> None:
        if self.draft_pool:
            self.draft_pool.shutdown()
        for pool in self.targets.values():
            pool.shutdown()

    def live_requests(self) -> dict[str, list]:
        """Requests each actor still holds (every one should be empty when idle)."""
        import ray

        out: dict[str, list] = {}
        if self.draft_pool:
            for i, h in enumerate(self.draft_pool.handles()):
                out[f"draft/{i}"] = ray.get(h.live_requests.remote())
        for name, pool in self.targets.items():
            for i, m in enumerate(pool.members):
                out[f"{name}/{i}"] = ray.get(m.handle.live_requests.remote())
                for j, s in enumerate(m.shards):
                    out[f"{name}/{i}/shard{j}"] = ray.get(s.live_sequences.remote())
        return out
