"""The engine over the pools (actors/pools.py): one request's loop across a draft replica
and a target replica, failover and resume when a target replica fails, the heartbeat
(actors/health.py) and pool scaling (actors/autoscale.py) started with it.

Faults, per request: a target replica that fails (dies, hangs, loses the request's state) is
marked and the request goes on on another healthy replica, or waits for one (a restart)
while it may (its deadline, or REPLICA_WAIT_S): it re-prefills its prompt plus the tokens it
already emitted, so a stream continues where it was (greedy output unchanged). A draft
replica that fails is marked and skipped until it answers again; the request finishes
target-only meanwhile (no token lost or repeated).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import replace
from typing import Callable, Sequence

from tandem.actors.autoscale import PoolAutoscaler, ScaleEvent, ScalePolicy
from tandem.actors.health import HealthMonitor
from tandem.actors.pools import DRAFT_POOL, DraftPool, TargetPool
from tandem.actors.remote import POLL_S, CallWatch, RaySide
from tandem.actors.speculative import GenerationResult, SideUnavailableError, SpecConfig, request_steps
from tandem.actors.steps import Sleep, Steps, drive, drive_async
from tandem.speculation.plan import RoundPlan
from tandem.speculation.sampling import SamplingParams, TokenLogprob
from tandem.speculation.stats import SpecStats

log = logging.getLogger("tandem.engine")

MAX_TARGET_ATTEMPTS = 4  # replicas a request may try (nothing lost: it resumes where it was)
REPLICA_WAIT_S = 120.0  # without a deadline, how long a request waits for a healthy replica


class ActorEngine:
    """Runs requests across a draft pool and target pools, with the fault handling the
    module describes. The router (services/) adds policy (method, exit, draft length)."""

    def __init__(self, draft_pool: DraftPool | None, target_pools: dict[str, TargetPool], *, heartbeat_s: float | None = 2.0, heartbeat_timeout_s: float = 10.0, restart_grace_s: float = 300.0):
        self.draft_pool = draft_pool
        self.targets = target_pools
        self._ids = itertools.count()
        # a shared pool's router prefixes its requests' keys on the actors with its owner id,
        # so that the others can close what it leaves behind if it dies (actors/directory.py)
        self.key_prefix = next((f"{p.shared.owner}/" for p in [draft_pool, *target_pools.values()]
                                if p is not None and p.shared is not None), "")
        self.monitor = None
        self.autoscaler: PoolAutoscaler | None = None
        if heartbeat_s:
            pools = [*([draft_pool] if draft_pool else []), *target_pools.values()]
            self.monitor = HealthMonitor(pools, interval_s=heartbeat_s, timeout_s=heartbeat_timeout_s, restart_grace_s=restart_grace_s)

    def start_autoscaler(
        self,
        policies: dict[str, ScalePolicy],
        *,
        queued: Callable[[str], int] | None = None,
        on_event: Callable[[ScaleEvent], None] | None = None,
        interval_s: float = 1.0,
    ) -> PoolAutoscaler:
        """Scale the pools named in `policies` (DRAFT_POOL for the draft pool, else a target
        name) from their load plus `queued(name)` (requests waiting for that pool)."""
        scaler = PoolAutoscaler(interval_s=interval_s, on_event=on_event)
        for name, policy in policies.items():
            pool = self.draft_pool if name == DRAFT_POOL else self.targets[name]
            scaler.add(name, pool, policy, queued=(lambda n=name: queued(n)) if queued is not None else None)
        self.autoscaler = scaler.start()
        return scaler

    def target_health(self) -> dict[str, bool]:
        """Per target: whether some replica can take a request now."""
        return {name: pool.healthy for name, pool in self.targets.items()}

    def _wait_for_replica(self, pool: TargetPool, should_stop, *, name: str) -> Steps:
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
            yield Sleep(POLL_S)

    def generate(self, target: str, prompt: Sequence[int], **kwargs) -> GenerationResult:
        """One request on this thread (it blocks on the actors' answers): steps()'s arguments."""
        return drive(self.steps(target, prompt, **kwargs))

    async def agenerate(self, target: str, prompt: Sequence[int], **kwargs) -> GenerationResult:
        """One request on the running event loop, holding no thread while it waits on the
        actors (the router's way): steps()'s arguments; the callbacks run on the loop."""
        return await drive_async(self.steps(target, prompt, **kwargs))

    def steps(
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
        tracing=None,
        on_logprobs: Callable[[list[TokenLogprob]], None] | None = None,
        round_plan: Callable[[], RoundPlan] | None = None,
    ) -> Steps:
        """One request as a step generator (actors/steps.py) returning its GenerationResult.
        tracing: for a traced request, where its actor calls' spans go (RaySide's `tracing`).
        on_logprobs, round_plan: as run_request's (sampling.logprobs set), over every attempt."""
        if target not in self.targets:
            raise KeyError(f"target {target!r} is not served; targets: {', '.join(sorted(self.targets))}")
        pool = self.targets[target]
        sampling = sampling or SamplingParams()
        key = self.key_prefix + (request_id or f"r{next(self._ids)}-{uuid.uuid4().hex[:12]}")
        prompt = [int(t) for t in prompt]
        emitted: list[int] = []  # tokens already handed to on_tokens, over every attempt
        emitted_lp: list[TokenLogprob] | None = [] if sampling.logprobs is not None else None

        def track(tokens: list[int]) -> None:
            emitted.extend(tokens)
            if on_tokens is not None:
                on_tokens(tokens)

        def track_logprobs(logprobs: list[TokenLogprob]) -> None:
            emitted_lp.extend(logprobs)
            if on_logprobs is not None:
                on_logprobs(logprobs)

        t0 = time.perf_counter()
        parts: list[GenerationResult] = []
        reason = None  # set by the attempt that finishes
        for attempt in range(1, MAX_TARGET_ATTEMPTS + 1):
            picked = yield from self._wait_for_replica(pool, should_stop, name=target)
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
                    draft_side = RaySide(draft_pick[1].handle, role="draft", watch=watch, member=draft_pick[1], on_failure=lambda i=di: self.draft_pool.mark_failed(i), tracing=tracing)
                target_side = RaySide(member.handle, role="target", watch=watch, member=member, on_failure=lambda i=ti: pool.mark_failed(i), tracing=tracing)
                parts.append(
                    (yield from request_steps(
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
                        on_logprobs=track_logprobs if emitted_lp is not None else None,
                        prompt_len=len(prompt),  # penalties count what was emitted as output
                        round_plan=round_plan,
                    ))
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
        merged = _merge(parts, emitted, reason=reason, prompt_tokens=len(prompt), total_s=time.perf_counter() - t0)
        merged.logprobs = emitted_lp
        return merged

    def shutdown(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.stop()
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
                if m.retired:
                    continue
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
