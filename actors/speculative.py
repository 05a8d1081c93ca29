"""The per-request speculation loop: draft, verify, commit, roll back.

Glossary
- round: one verification (and, for PEARL, the drafting that overlaps it).
- method:
  - ``ar``: target only, one token per forward.
  - ``sd``: standard speculative decoding: draft `draft_len` tokens, then verify them (+ bonus).
  - ``sorted``: sd with S2D sorted drafting (several exits of one draft, per-target
    thresholds; arXiv 2407.01955).
  - ``pearl``: PEARL (arXiv 2408.11850): while the target verifies block i, the draft
    already drafts block i + 1 assuming block i is accepted (post-verify); after a rejection
    the next block is a single token, so the target checks the first new draft token while
    the draft drafts on (pre-verify). No bonus token is taken when a block is accepted in
    full: the draft has continued from there.
  - ``spectr``: SpecTr K-SEQ (arXiv 2310.15141): k draft branches verified in one batched
    forward.

The loop talks to the two sides through *handles* whose calls return futures, so the same
code drives plain objects on threads (in-process) and Ray actors (actors/pools.py, actors/engine.py).
It is a step generator (actors/steps.py): it yields each future it waits on, so it runs on a
thread (run_request) or on an event loop with no thread of its own (drive_async). Only
token ids, sparse q and small dataclasses (logprobs: a token's value and its top N) cross a
handle. Past 400 lines on purpose: the five loops share one open / commit / close protocol
(_Progress, _record, request_steps), which splitting them apart would repeat.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence


from tandem.actors.devices import thread_initializer
from tandem.actors.steps import Steps, drive
from tandem.speculation.plan import TARGET_STEPS_PER_CALL, RoundPlan, SpecConfig, context_reserve
from tandem.speculation.sampling import SamplingParams, TokenLogprob
from tandem.speculation.stats import SpecStats

class CallFuture(Protocol):
    def result(self) -> Any: ...


class SideHandle(Protocol):
    """One side (draft or target) of a request. `call` runs a method of the side's object
    (Drafter or Verifier) and returns a future; calls on one side run in order."""

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> CallFuture: ...


class LocalSide:
    """A plain object served by one worker thread with its own torch thread count.

    PyTorch's intra-op thread count is per calling thread (OpenMP), so a draft thread and a
    target thread can each run with the threads assigned to them, concurrently."""

    def __init__(self, obj: Any, *, threads: int, name: str):
        self.obj = obj
        self.threads = threads
        # the worker thread takes the torch thread count and this thread's default device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=thread_initializer(threads))

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Future:
        return self._pool.submit(getattr(self.obj, method), *args, **kwargs)

    def run(self, fn: Callable[[], Any]) -> Future:
        """fn() on this side's thread (its torch threads and default device)."""
        return self._pool.submit(fn)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class RequestStateLostError(KeyError):
    """A side does not hold the request (never opened, or its actor restarted and lost it)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "request state lost"


class RequestCancelledError(RuntimeError):
    """A side dropped a request's work because the request was cancelled (its client left or
    its deadline passed): queued calls are refused and a long prefill stops between chunks."""


class RequestAlreadyOpenError(ValueError):
    """A side already holds state under this request id. Opening it again would hand one
    request's cache and committed tokens to another, so it is refused, never overwritten."""


class SideUnavailableError(RuntimeError):
    """An actor on one side of a request failed (died, unreachable). A draft failure never
    fails a request (it finishes target-only); a target failure carries how many tokens the
    request had emitted, so the caller knows whether a retry elsewhere is safe."""

    def __init__(self, message: str, *, role: str, emitted: int = 0):
        super().__init__(message)
        self.role = role
        self.emitted = emitted
        self.partial: GenerationResult | None = None  # what the request did before the failure


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens (prompt excluded)
    finish_reason: str  # length | eos | stop | cancelled | deadline | error
    stats: SpecStats
    prompt_tokens: int
    prefill_s: float = 0.0  # time to the first token
    total_s: float = 0.0
    target_s: float = 0.0  # wall time inside target calls
    draft_s: float = 0.0  # wall time inside draft calls (PEARL: overlapped)
    draft_failed: bool = False
    per_round_s: list[float] = field(default_factory=list)
    critical_s: float = 0.0  # time inside draft/target calls on the round's critical path
    logprobs: list[TokenLogprob] | None = None  # one per token when sampling.logprobs is set
    plan: Any = None  # the planner's Plan (speculation/plan.py) when the engine planned the request

    @property
    def overhead_frac(self) -> float:
        """Share of round time spent outside the sides' calls (transport, orchestration)."""
        rounds = sum(self.per_round_s)
        return max(0.0, 1.0 - self.critical_s / rounds) if rounds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.total_s if self.total_s > 0 else 0.0


@dataclass
class _Progress:
    """Committed output and stop handling shared by every method."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset[int]
    on_tokens: Callable[[list[int]], None] | None
    on_round: Callable[[dict], None] | None = None
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None  # kept in step with `out` when requested
    on_logprobs: Callable[[list[TokenLogprob]], None] | None = None

    @property
    def committed(self) -> list[int]:
        return self.prompt + self.out

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.out)

    def commit(self, tokens: Sequence[int], logprobs: Sequence[TokenLogprob] | None = None) -> None:
        """Commit a round's tokens (cut at max_new_tokens or a stop id); their logprobs, when
        the request asked for them, go out just before the tokens (on_logprobs, on_tokens)."""
        new: list[int] = []
        for t in tokens:
            if len(self.out) + len(new) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
            new.append(int(t))
            if t in self.stop_ids:
                self.finish_reason = "eos"
                break
        if len(self.out) + len(new) >= self.max_new_tokens and self.finish_reason is None:
            self.finish_reason = "length"
        self.out.extend(new)
        if self.logprobs is not None and new:
            if logprobs is None or len(logprobs) < len(new):
                raise RuntimeError("the target returned no logprobs for committed tokens")
            self.logprobs.extend(logprobs[: len(new)])
            if self.on_logprobs is not None:
                self.on_logprobs(list(logprobs[: len(new)]))
        if new and self.on_tokens is not None:
            self.on_tokens(new)


def request_steps(
    *,
    draft: SideHandle | None,
    target: SideHandle,
    request_id: str,
    prompt: Sequence[int],
    sampling: SamplingParams,
    max_new_tokens: int,
    spec: SpecConfig,
    stop_ids: Sequence[int] = (),
    on_tokens: Callable[[list[int]], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_logprobs: Callable[[list[TokenLogprob]], None] | None = None,
    prompt_len: int | None = None,
    round_plan: Callable[[], RoundPlan] | None = None,
) -> Steps:
    """Generate for one request, as a step generator (actors/steps.py: drive it on a thread,
    or drive_async on an event loop); returns the GenerationResult. Opens and always closes
    the request on both sides.

    on_tokens: called with each commit's tokens (streaming).
    should_stop: polled once per round; returns a finish reason ("cancelled", "deadline",
    "stop") to stop, or None to go on.
    on_round: called after each round with {index, start_ns, end_ns, drafted, accepted,
    emitted, exits, exit_seq, draft_s, caught_up, verify_s, step_rows} (telemetry, the router's policy).
    on_logprobs: with sampling.logprobs set, called with each commit's TokenLogprob list just
    before on_tokens gets its tokens (result.logprobs holds them all).
    prompt_len: how many leading tokens of `prompt` are the request's own prompt (a resumed
    request passes its prompt plus what it already emitted; penalties count the latter as
    output); None: all of `prompt`.
    round_plan: called before each round's drafting: that round's draft tokens and exits,
    re-planned at the load of the moment (RoundPlan; draft_len 0: a target-only step; capped
    at spec.draft_len, which sized the caches); None: spec.draft_len and spec.policy every
    round.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    t_start = time.perf_counter()
    progress = _Progress(
        prompt=[int(t) for t in prompt],
        max_new_tokens=max_new_tokens,
        stop_ids=frozenset(int(s) for s in stop_ids),
        on_tokens=on_tokens,
        on_round=on_round,
        logprobs=[] if sampling.logprobs is not None else None,
        on_logprobs=on_logprobs,
    )
    stats = SpecStats()
    result = GenerationResult(
        tokens=progress.out, finish_reason="length", stats=stats, prompt_tokens=len(prompt), logprobs=progress.logprobs
    )
    prompt_len = len(progress.prompt) if prompt_len is None else int(prompt_len)
    use_draft = spec.method != "ar" and draft is not None
    capacity = len(prompt) + max_new_tokens + context_reserve(spec.draft_len)
    draft_open = None
    try:
        if use_draft:
            draft_open = draft.call("open", request_id, sampling=sampling, capacity=capacity, prompt_len=prompt_len)
        # the target's cache is allocated once at what the router's admission reserved
        prefill = target.call("open", request_id, progress.prompt, sampling=sampling, prompt_len=prompt_len, capacity=capacity)
        yield prefill
        # The prefill's logits give the first token for free: stream it before any drafting.
        first = yield target.call("verify", request_id, None, bonus=True)
        progress.commit(first.tokens, first.logprobs)
        _first_token_time(result, progress, t_start)
        if draft_open is not None:
            try:
                yield draft_open
            except Exception:  # noqa: BLE001 - a broken draft never fails the request
                use_draft = False
                result.draft_failed = True
        loop = {
            "ar": _loop_sd,
            "sd": _loop_sd,
            "sorted": _loop_sd,
            "pearl": _loop_pearl,
            "spectr": _loop_spectr,
        }[spec.method]
        yield from loop(
            draft=draft if use_draft else None,
            target=target,
            request_id=request_id,
            spec=spec,
            progress=progress,
            stats=stats,
            result=result,
            should_stop=should_stop,
            t_start=t_start,
            want=_wanted(spec, round_plan),
        )
    except RequestCancelledError:
        # the caller asked a side to drop this request's work (cancel or deadline)
        progress.finish_reason = progress.finish_reason or (should_stop() if should_stop else None) or "cancelled"
    except SideUnavailableError as exc:
        exc.emitted = len(progress.out)
        result.total_s = time.perf_counter() - t_start
        exc.partial = result
        raise
    finally:
        closes = [target.call("close", request_id)]
        if draft_open is not None:
            closes.append(draft.call("close", request_id))
        for c in closes:
            try:
                yield c
            except Exception:  # noqa: BLE001 - closing a dead side is not an error
                pass
    result.finish_reason = progress.finish_reason or result.finish_reason
    result.total_s = time.perf_counter() - t_start
    return result


def run_request(**kwargs: Any) -> GenerationResult:
    """request_steps' keywords -> its GenerationResult, driven on this thread (each call's
    answer waited for here)."""
    return drive(request_steps(**kwargs))


def _wanted(spec: SpecConfig, round_plan: Callable[[], RoundPlan] | None) -> Callable[[], RoundPlan]:
    """The next round's draft tokens (0: target only, never above spec.draft_len) and exits
    (the request's own where the re-plan hook names none)."""
    if round_plan is None:
        return lambda: RoundPlan(spec.draft_len, spec.policy)

    def want() -> RoundPlan:
        r = round_plan()
        return RoundPlan(max(0, min(spec.draft_len, int(r.draft_len))), r.policy or spec.policy)

    return want


def _first_token_time(result: GenerationResult, progress: _Progress, t_start: float) -> None:
    if result.prefill_s == 0.0 and progress.out:
        result.prefill_s = time.perf_counter() - t_start


def _stop_requested(progress: _Progress, should_stop) -> bool:
    if progress.finish_reason is not None:
        return True
    if should_stop is not None:
        reason = should_stop()
        if reason:
            progress.finish_reason = reason
            return True
    return False


def _draft_or_none(fut: CallFuture | None, result: GenerationResult) -> Steps:
    """Resolve a draft future; a failed draft turns the request target-only."""
    if fut is None:
        return None
    try:
        return (yield fut)
    except Exception:  # noqa: BLE001 - any draft failure: finish without the draft
        result.draft_failed = True
        return None


def _record(
    stats: SpecStats, result: GenerationResult, outcome, block, t_round: float, *, critical_s: float, progress: _Progress, draft_s: float = 0.0,
    t_end: float | None = None,
) -> None:
    """One round from t_round to t_end (perf_counter; None: now) into stats, result and on_round."""
    result.critical_s += critical_s
    exits = list(getattr(block, "exits", None) or ())
    stats.record_round(drafted=outcome.drafted, accepted=outcome.accepted_len, emitted=len(outcome.tokens), exits=exits)
    result.target_s += outcome.target_s
    now = time.perf_counter()
    t_end = now if t_end is None else t_end
    elapsed = t_end - t_round
    result.per_round_s.append(elapsed)
    if progress.on_round is not None:
        end_ns = time.time_ns() - int((now - t_end) * 1e9)
        used: dict[int, int] = {}
        for e in exits:
            used[e] = used.get(e, 0) + 1
        progress.on_round(
            {
                "index": stats.rounds - 1,
                "start_ns": end_ns - int(elapsed * 1e9),
                "end_ns": end_ns,
                "drafted": outcome.drafted,
                "accepted": outcome.accepted_len,
                "emitted": len(outcome.tokens),
                "exits": used,
                "exit_seq": exits,  # the exit of each draft token, in order (accepted ones first)
                "draft_s": draft_s,
                "caught_up": getattr(block, "caught_up", 0),  # tokens the draft fed before drafting them
                "verify_s": outcome.target_s,
                "step_rows": outcome.step_rows,  # rows of the target forward it ran in
            }
        )


def _target_steps(*, target, request_id, progress, stats, result, t_start, t_round) -> Steps:
    """A round planned without drafts: up to TARGET_STEPS_PER_CALL target-only steps in one
    call (Verifier.steps), each committed and recorded as a round of its own, over its share
    of the call's wall time, so stats, telemetry and the goodput policy see what one call
    per step would have shown them."""
    n = max(1, min(TARGET_STEPS_PER_CALL, progress.remaining))
    outcomes = yield target.call("steps", request_id, n, stop_ids=sorted(progress.stop_ids))
    t_end = time.perf_counter()
    total = sum(o.target_s for o in outcomes)
    t = t_round
    for o in outcomes:
        if progress.finish_reason is not None:  # the target stops at these too; never past them
            break
        t_next = t + (t_end - t_round) * (o.target_s / total if total > 0 else 1 / len(outcomes))
        progress.commit(o.tokens, o.logprobs)
        _first_token_time(result, progress, t_start)
        _record(stats, result, o, None, t, critical_s=o.target_s, progress=progress, t_end=t_next)
        t = t_next


def _loop_sd(*, draft, target, request_id, spec, progress, stats, result, should_stop, t_start, want) -> None:
    """ar / sd / sorted: draft a block, then verify it; strictly one after the other. A
    round re-planned to 0 drafts is a target-only step; the draft catches up on the tokens
    it missed at its next block (it is handed everything committed)."""
    while not _stop_requested(progress, should_stop):
        t_round = time.perf_counter()
        rp = want() if draft is not None else RoundPlan(0)
        draft_len = min(rp.draft_len, max(progress.remaining - 1, 0))
        block = None
        if draft is not None and draft_len > 0:
            block = yield from _draft_or_none(
                draft.call("draft", request_id, progress.committed, draft_len=draft_len, policy=rp.policy), result
            )
            if block is None:
                draft = None  # the draft died: target-only from here, nothing lost
            else:
                result.draft_s += block.draft_s
        if block is None:
            yield from _target_steps(
                target=target, request_id=request_id, progress=progress, stats=stats, result=result, t_start=t_start, t_round=t_round
            )
            continue
        outcome = yield target.call("verify", request_id, block, bonus=True)
        progress.commit(outcome.tokens, outcome.logprobs)
        _first_token_time(result, progress, t_start)
        draft_s = block.draft_s
        _record(stats, result, outcome, block, t_round, critical_s=outcome.target_s + draft_s, progress=progress, draft_s=draft_s)


def _loop_spectr(*, draft, target, request_id, spec, progress, stats, result, should_stop, t_start, want) -> None:
    """SpecTr: k branches drafted as one batch, verified as one batch."""
    while not _stop_requested(progress, should_stop):
        t_round = time.perf_counter()
        draft_len = min(want().draft_len if draft is not None else 0, max(progress.remaining - 1, 0))
        branches = None
        if draft is not None and draft_len > 0:
            branches = yield from _draft_or_none(
                draft.call("draft_branches", request_id, progress.committed, draft_len=draft_len, k=spec.k), result
            )
            if branches is None:
                draft = None
            else:
                result.draft_s += branches.draft_s
        if branches is None:
            yield from _target_steps(
                target=target, request_id=request_id, progress=progress, stats=stats, result=result, t_start=t_start, t_round=t_round
            )
            continue
        outcome = yield target.call("verify_branches", request_id, branches)
        progress.commit(outcome.tokens, outcome.logprobs)
        _first_token_time(result, progress, t_start)
        draft_s = branches.draft_s
        _record(stats, result, outcome, None, t_round, critical_s=outcome.target_s + draft_s, progress=progress, draft_s=draft_s)


def _loop_pearl(*, draft, target, request_id, spec, progress, stats, result, should_stop, t_start, want) -> None:
    """PEARL: verification of block i overlaps drafting of block i + 1 (post-verify); after
    a rejection the next block is one token long (pre-verify). A round re-planned to 0
    drafts drafts nothing ahead, and the round after it is a target-only step."""
    block = None  # drafted, not yet verified; continues progress.committed
    next_draft_len = 1 if spec.pre_verify else spec.draft_len
    while not _stop_requested(progress, should_stop):
        t_round = time.perf_counter()
        rp = want() if draft is not None else RoundPlan(0)
        wanted = rp.draft_len if block is None else 1
        if draft is None or wanted == 0:
            yield from _target_steps(
                target=target, request_id=request_id, progress=progress, stats=stats, result=result, t_start=t_start, t_round=t_round
            )
            continue
        sequential_draft_s = 0.0
        if block is None:  # nothing in flight: draft the first block of a run
            draft_len = max(1, min(next_draft_len, wanted, progress.remaining))
            block = yield from _draft_or_none(draft.call("draft", request_id, progress.committed, draft_len=draft_len, policy=rp.policy), result)
            if block is None:
                draft = None
                continue
            result.draft_s += block.draft_s
            sequential_draft_s = block.draft_s
        # Verify block i (no bonus: the draft continues past it) while drafting block i + 1.
        v_fut = target.call("verify", request_id, block, bonus=False)
        ahead = progress.remaining - len(block.tokens)
        d_fut = None
        ahead_len = min(rp.draft_len, ahead) if ahead > 0 else 0
        if ahead_len > 0:
            assumed = progress.committed + block.tokens
            d_fut = draft.call("draft", request_id, assumed, draft_len=ahead_len, policy=rp.policy)
        outcome = yield v_fut
        nxt = yield from _draft_or_none(d_fut, result)
        if d_fut is not None and nxt is None:
            draft = None
        progress.commit(outcome.tokens, outcome.logprobs)
        _first_token_time(result, progress, t_start)
        overlapped = max(outcome.target_s, nxt.draft_s if nxt is not None else 0.0)
        _record(
            stats, result, outcome, block, t_round, critical_s=sequential_draft_s + overlapped, progress=progress, draft_s=block.draft_s
        )
        if nxt is not None:
            result.draft_s += nxt.draft_s
        if outcome.accepted_len == len(block.tokens) and nxt is not None:
            block = nxt  # post-verify paid off: the next block is already drafted
        else:
            # Rejected (the block drafted ahead is void), or nothing was drafted ahead; after
            # a full accept the target keeps its pending row, so no token is lost either way.
            block = None
            next_draft_len = 1 if spec.pre_verify and outcome.accepted_len < outcome.drafted else spec.draft_len
