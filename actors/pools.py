"""Ray pools: a shared draft pool and one target pool per target, placed on distinct Ray
resources through placement groups, and the per-request loop run across them.

Placement: every pool reserves one bundle per actor in a placement group. On a CPU box the
bundles ask for custom resources (`draft_pool`, `target_pool`) that the embedded Ray
advertises; on a cluster they ask for GPUs and an accelerator type, and the Ray autoscaler
(KubeRay) adds nodes of the matching worker group. A sharded target replica is a pipeline of
TargetShard actors (each in its own bundle) behind a light TargetWorker front.

Faults:
- draft actor dies or hangs: the request finishes target-only (the loop absorbs draft
  failures, no token lost or repeated); the replica is skipped until it answers the
  heartbeat again (actors/health.py), and Ray restarts it (max_restarts).
- target replica (or one of its shards) dies, hangs or loses a request's state: the request
  waits for a healthy replica within its deadline and resumes there from the tokens it
  already emitted (ActorEngine.generate).

Past ~400 lines on purpose: the engine's failover reads and marks the same replica records
(_Member) that the pools keep; the Ray call plumbing (actors/remote.py) and the heartbeat
(actors/health.py) live apart.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from actors.health import HealthMonitor
from actors.remote import POLL_S, CallWatch, RaySide
from actors.speculative import GenerationResult, SideUnavailableError, SpecConfig, run_request
from actors.workers import DraftWorker, ModelLoad, TargetWorker
from speculation.sampling import SamplingParams
from speculation.stats import SpecStats

log = logging.getLogger("tandem.pools")


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


def _remote(cls, *, placement: Placement, pg, index: int, name: str | None = None, restarts: int = -1):
    import ray
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
    hung: bool = False  # missed its last heartbeat (HealthMonitor)
    replaced_at: float = 0.0  # when the monitor last killed it for Ray to restart

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
            choices = [(m.inflight, i) for i, m in enumerate(self.members) if m.healthy and i not in exclude]
            if not choices and not healthy_only:
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

    def mark_failed(self, i: int) -> None:
        self.members[i].mark_failed()

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
            # the front holds no model: request state and verification only; restartable like
            # the stages (it is rebuilt over the same stage handles)
            front = ray.remote(TargetWorker).options(
                num_cpus=0, max_restarts=spec.max_restarts, max_concurrency=64, enable_task_events=False
            )
            members.append(_Member(handle=front.remote(None, threads=1, stages=stages), shards=stages))
        self.members = members
        self.chooser = _LeastLoaded(members)
        infos = ray.get([m.handle.info.remote() for m in members], timeout=timeout_s)
        self.info = infos[0]

    def acquire(self, exclude: set[int] = frozenset(), *, healthy_only: bool = False):
        return self.chooser.acquire(exclude, healthy_only=healthy_only)

    def release(self, i: int) -> None:
        self.chooser.release(i)

    def mark_failed(self, i: int) -> None:
        self.members[i].mark_failed()

    @property
    def healthy(self) -> bool:
        """Some replica can take a request now."""
        return any(m.healthy for m in self.members)

    def handles(self) -> list:
        return [m.handle for m in self.members]

    def shutdown(self) -> None:
        _shutdown(self.members, self.pg)


# ---------------------------------------------------------------------------------------
# Generation across the pools
# ---------------------------------------------------------------------------------------


MAX_TARGET_ATTEMPTS = 4  # replicas a request may try (nothing lost: it resumes where it was)
REPLICA_WAIT_S = 120.0  # without a deadline, how long a request waits for a healthy replica


class ActorEngine:
    """Runs requests across a draft pool and target pools; handles faults as documented
    above. The router (services/) adds policy (method, exit, draft length) on top.

    Faults, per request: a target replica that fails (dies, hangs, loses the request's
    state) is marked and the request goes on on another healthy replica, or waits for one
    (a restart) while it may (its deadline, or REPLICA_WAIT_S): it re-prefills its prompt
    plus the tokens it already emitted, so a stream continues where it was (greedy output
    unchanged). A draft replica that fails is marked and skipped until it answers again."""

    def __init__(self, draft_pool: DraftPool | None, target_pools: dict[str, TargetPool], *, heartbeat_s: float | None = 2.0, heartbeat_timeout_s: float = 10.0, restart_grace_s: float = 300.0):
        self.draft_pool = draft_pool
        self.targets = target_pools
        self._ids = itertools.count()
        self.monitor = None
        if heartbeat_s:
            pools = [*([draft_pool] if draft_pool else []), *target_pools.values()]
            self.monitor = HealthMonitor(pools, interval_s=heartbeat_s, timeout_s=heartbeat_timeout_s, restart_grace_s=restart_grace_s)

    def target_health(self) -> dict[str, bool]:
        """Per target: whether some replica can take a request now."""
        return {name: pool.healthy for name, pool in self.targets.items()}

    def _wait_for_replica(self, pool: TargetPool, should_stop, *, name: str):
        """A healthy replica, waiting (a restart) while the request may; None when the
        request stopped (deadline, cancel) meanwhile."""
        waited_from = time.monotonic()
        while True:
            picked = pool.acquire(healthy_only=True)
            if picked is not None:
                return picked
            if should_stop is not None and should_stop():
                return None
            if time.monotonic() - waited_from > REPLICA_WAIT_S:
                raise SideUnavailableError(f"target {name!r}: no healthy replica within {REPLICA_WAIT_S:.0f}s", role="target")
            time.sleep(POLL_S)

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
        key = request_id or f"r{next(self._ids)}-{time.monotonic_ns()}"
        prompt = [int(t) for t in prompt]
        emitted: list[int] = []  # tokens already handed to on_tokens, over every attempt

        def track(tokens: list[int]) -> None:
            emitted.extend(tokens)
            if on_tokens is not None:
                on_tokens(tokens)

        t0 = time.perf_counter()
        parts: list[GenerationResult] = []
        reason = None  # set by the attempt that finishes
        for attempt in range(1, MAX_TARGET_ATTEMPTS + 1):
            picked = self._wait_for_replica(pool, should_stop, name=target)
            if picked is None:
                break  # stopped while waiting: finish with what was emitted
            ti, member = picked
            draft_pick = self.draft_pool.acquire() if (self.draft_pool and spec.method != "ar") else None
            attempt_key = f"{key}-{attempt}"
            watch = CallWatch(key=attempt_key, should_stop=should_stop)
            try:
                draft_side = None
                if draft_pick is not None:
                    di = draft_pick[0]
                    draft_side = RaySide(draft_pick[1].handle, role="draft", watch=watch, member=draft_pick[1], on_failure=lambda i=di: self.draft_pool.mark_failed(i))
                target_side = RaySide(member.handle, role="target", watch=watch, member=member, on_failure=lambda i=ti: pool.mark_failed(i))
                parts.append(
                    run_request(
                        draft=draft_side,
                        target=target_side,
                        request_id=attempt_key,
                        prompt=prompt + emitted,  # a resumed attempt re-prefills what was sent
                        sampling=_resumed(sampling, attempt),
                        max_new_tokens=max_new_tokens - len(emitted),
                        spec=spec,
                        stop_ids=stop_ids,
                        on_tokens=track,
                        should_stop=should_stop,
                        on_round=on_round,
                    )
                )
                reason = parts[-1].finish_reason
                break
            except SideUnavailableError as exc:
                if exc.role != "target":
                    raise
                if exc.partial is not None:
                    parts.append(exc.partial)
                if attempt == MAX_TARGET_ATTEMPTS:
                    raise SideUnavailableError(
                        f"target {target!r} failed {attempt} times ({exc}); {len(emitted)} tokens were sent",
                        role="target",
                        emitted=len(emitted),
                    ) from exc
                log.warning("target %r replica %d failed (%s); request resumes after %d tokens", target, ti, exc, len(emitted))
                if len(emitted) >= max_new_tokens:
                    reason = "length"  # it had finished when the replica failed
                elif emitted and emitted[-1] in set(stop_ids):
                    reason = "eos"
                if reason is not None:
                    break
            finally:
                pool.release(ti)
                if draft_pick is not None:
                    self.draft_pool.release(draft_pick[0])
        if reason is None:  # stopped while waiting for a replica
            reason = (should_stop() if should_stop is not None else None) or "cancelled"
        return _merge(parts, emitted, reason=reason, prompt_tokens=len(prompt), total_s=time.perf_counter() - t0)

    def shutdown(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
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


def _resumed(sampling: SamplingParams, attempt: int) -> SamplingParams:
    """A resumed attempt draws fresh randomness (a seeded request stays reproducible)."""
    if attempt == 1 or sampling.seed is None:
        return sampling
    return replace(sampling, seed=(sampling.seed + 1_000_003 * (attempt - 1)) % 2**64)


def _merge(parts: list[GenerationResult], emitted: list[int], *, reason: str, prompt_tokens: int, total_s: float) -> GenerationResult:
    """One result over a request's attempts (each resumed where the last one failed)."""
    stats = SpecStats()
    for part in parts:
        stats.merge(part.stats)
    return GenerationResult(
        tokens=list(emitted),
        finish_reason=reason,
        stats=stats,
        prompt_tokens=prompt_tokens,
        prefill_s=parts[0].prefill_s if parts else 0.0,
        total_s=total_s,
        target_s=sum(p.target_s for p in parts),
        draft_s=sum(p.draft_s for p in parts),
        draft_failed=any(p.draft_failed for p in parts),
        per_round_s=[r for p in parts for r in p.per_round_s],
        critical_s=sum(p.critical_s for p in parts),
    )
