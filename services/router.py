"""The router: several targets behind one endpoint, one shared draft pool for all of them.

Per request it validates limits, admits the request by its KV reservation through its
target's bounded queue (services/admission.py; each target has its own admission, so one
target's hung actors cannot hold up another's requests), has the planner
(speculation/plan.py) pick the method, draft exit and draft length for the request's target
(its goodput policy, speculation/goodput.py), runs the speculation loop across the actor
pools as a task on the server's event loop (engine.agenerate: a step generator that awaits
the actors' answers, so no request holds a thread; actors/steps.py), and streams deltas
back. Deadlines,
client cancellation and stop strings end the loop at the next round, and reach the actors
too (their queued and running work for the request is dropped); the loop then frees the
request's KV on every actor it touched, and only then its admission slot. A speculating
request also reserves its KV on the shared draft pool (services/admission.py DraftBudget);
when that does not fit it runs with speculation off instead of waiting.

Past ~400 lines because admission and the streaming loop share one request's state (slots,
stop watcher, trace, logprobs alignment); planning lives in speculation/plan.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from tandem.actors.pools import DRAFT_POOL
from tandem.actors.speculative import GenerationResult, SideUnavailableError
from tandem.services.admission import Admission, DraftBudget, Slot
from tandem.speculation.goodput import GoodputPolicy
from tandem.speculation.plan import Plan, RoundPlan, RoundPlanner, SpecConfig, context_reserve, kv_copies, per_replica
from tandem.speculation.plan import plan as plan_request
from tandem.speculation.sampling import SamplingParams
from tandem.speculation.sorted_policy import ExitPolicy

log = logging.getLogger("tandem.router")



class UnknownTargetError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown target"


@dataclass(frozen=True)
class RouteRequest:
    """A validated, tokenized request (built by the servicer). `request_id` is the client's
    (or a server-made) label, echoed and logged only; actor state is keyed by a fresh
    server-owned key per request (Router.new_state_key)."""

    request_id: str
    target: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    method: str = "auto"
    max_draft_len: int | None = None
    deadline: float | None = None  # time.monotonic() value
    # telemetry: the client's trace context (services/telemetry.py context_from_metadata)
    # and gen_ai.operation.name ("chat" for chat-templated input)
    trace_parent: Any = None
    operation: str = "text_completion"


@dataclass
class Delta:
    """One streamed message: tokens committed in one round (text with stop strings cut)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    usage: dict | None = None
    stats: dict | None = None
    error: str | None = None
    logprobs: list | None = None  # sampling.logprobs set: a TokenLogprob per token_ids entry
    seed: int | None = None  # the last delta of a sampled request: the seed it used


@dataclass
class TargetRoute:
    """Everything the router knows about one target."""

    name: str
    model: str
    tokenizer: Any
    eos_ids: tuple[int, ...]
    max_context: int
    vocab_size: int
    default_method: str
    max_draft_len: int
    policy: GoodputPolicy | None
    sorted_policy: ExitPolicy | None = None
    replicas: int = 1
    shards: int = 1
    dtype: str = "bfloat16"
    running: int = 0
    waiting: int = 0
    mean_slot_s: float | None = None  # EWMA of how long a request held a slot (None: none ended yet)
    kv_tokens: int = 0  # KV positions its running requests hold on a replica: prompt + committed tokens
    # KV admission (services/admission.py): bytes per KV position on one replica (all its
    # layers, keys and values) and one replica's KV budget; 0: unknown, admission by count only
    kv_bytes_per_token: int = 0
    kv_budget_bytes: int = 0
    # per-method draft lengths measured for this target, used before its policy learns one
    # (the planner's draft_lens: an in-process engine's planned sd length and PEARL window)
    draft_lens: dict = field(default_factory=dict)


class StopWatcher:
    """Incremental detokenization with stop strings. Text that might be the start of a stop
    string is held back until it is resolved, so nothing after a stop string is ever sent."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of text already sent
        self.stopped = False

    def push(self, tokens: Sequence[int], *, final: bool = False) -> tuple[list[int], str]:
        """Add tokens; return (tokens to send, text to send)."""
        if self.stopped:
            return [], ""
        send_ids: list[int] = []
        for t in tokens:
            self.tokens.append(int(t))
            send_ids.append(int(t))
            if self.stop and self._stop_at() is not None:
                self.stopped = True
                break  # tokens after the one completing a stop string are dropped
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            return send_ids, self._emit(text[:cut])
        if not final:
            if text.endswith("\ufffd"):
                return send_ids, ""  # an incomplete character: wait for the next token
            hold = self._partial_stop_len(text)
            return send_ids, self._emit(text[: len(text) - hold])
        return send_ids, self._emit(text)

    def _emit(self, upto: str) -> str:
        out = upto[self.sent :]
        self.sent = max(self.sent, len(upto))
        return out

    def _stop_at(self, text: str | None = None) -> int | None:
        if not self.stop:
            return None
        if text is None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [text.find(s, max(0, self.sent - len(s))) for s in self.stop]
        hits = [h for h in hits if h >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self, text: str) -> int:
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best


class Router:
    """Routes requests to targets over an ActorEngine (actors/engine.py)."""

    def __init__(
        self,
        engine,
        routes: dict[str, TargetRoute],
        *,
        max_concurrent: int = 8,
        queue_size: int = 64,
        telemetry=None,
        draft_exits: Sequence[int] = (),
    ):
        self.engine = engine
        self.routes = routes
        self.max_concurrent = max_concurrent
        self.telemetry = telemetry
        self.draft_exits = tuple(draft_exits)
        # Per target: its own slots, so a target whose actors hang can fill only its own
        # (isolation). A slot is held until the request's work on the actors has ended, not
        # merely until its client left, so abandoned work counts against admission. The work
        # itself is a task on the server's event loop (engine.agenerate): no thread a request.
        self._tasks: set[asyncio.Task] = set()
        self.admission = {
            name: Admission(route, max_concurrent=max_concurrent, queue_size=queue_size, replicas=self._replicas_of(name))
            for name, route in routes.items()
        }
        self._ids = itertools.count()
        self._sorted_fallback_logged: set[str] = set()
        self.draft_budget = self._draft_budget()
        self.draftless = 0  # requests run with speculation off because the draft KV budget was full
        if telemetry is not None:
            telemetry.observe_requests(self.request_states)
            telemetry.observe_kv_tokens(self.kv_tokens)
            telemetry.observe_kv_bytes(self.kv_bytes)

    def _draft_budget(self) -> DraftBudget | None:
        """The draft pool's KV budget, as its actors report it (None: no draft pool, or an
        engine that does not report one)."""
        info = getattr(getattr(self.engine, "draft_pool", None), "info", None) or {}
        if not (info.get("kv_bytes_per_token") and info.get("kv_budget_bytes")):
            return None
        return DraftBudget(kv_bytes_per_token=info["kv_bytes_per_token"], kv_budget_bytes=info["kv_budget_bytes"],
                           replicas=lambda: self.serving_replicas().get(DRAFT_POOL, 1))

    def _replicas_of(self, name: str) -> Callable[[], int]:
        """Serving replicas of a target now (pools scale with traffic), for its KV budget."""
        return lambda: self.serving_replicas().get(name, self.routes[name].replicas)

    # ------------------------------------------------------------------ info
    def serving_replicas(self) -> dict[str, int]:
        """Replicas taking requests now, per target and DRAFT_POOL (pools scale with traffic);
        empty for an engine without pools."""
        out = {name: pool.size for name, pool in getattr(self.engine, "targets", {}).items() if hasattr(pool, "size")}
        draft = getattr(self.engine, "draft_pool", None)
        if draft is not None and hasattr(draft, "size"):
            out[DRAFT_POOL] = draft.size
        return out

    def target_health(self) -> dict[str, bool]:
        """Per target: whether some replica can take a request now (what the health service
        reports); empty for an engine that does not say."""
        health = getattr(self.engine, "target_health", None)
        return dict(health()) if callable(health) else {}

    def retry_after_s(self, target: str) -> float:
        """When a request refused for a full queue may try again (services/admission.py)."""
        return self.admission[target].retry_after_s()

    def request_states(self) -> dict[str, tuple[int, int]]:
        """{target: (running, waiting)}: requests holding a slot, and queued for one."""
        return {name: (r.running, r.waiting) for name, r in self.routes.items()}

    def kv_tokens(self) -> dict[str, int]:
        """{target: KV positions held by its running requests} (prompt plus committed tokens;
        a round's draft block is transient and not counted)."""
        return {name: r.kv_tokens for name, r in self.routes.items()}

    def kv_bytes(self) -> dict[str, tuple[int, int]]:
        """{target: (KV bytes reserved by running requests, KV budget of its serving replicas)}
        for targets whose KV size is known."""
        out = {name: (a.kv_reserved, a.kv_budget_total) for name, a in self.admission.items() if a.route.kv_bytes_per_token}
        if self.draft_budget is not None:
            out[DRAFT_POOL] = (self.draft_budget.kv_reserved, self.draft_budget.kv_budget_total)
        return out

    def queue_depths(self) -> dict[str, int]:
        return {name: r.running + r.waiting for name, r in self.routes.items()}

    def route(self, target: str) -> TargetRoute:
        if target not in self.routes:
            raise UnknownTargetError(f"target {target!r} is not served; targets: {', '.join(sorted(self.routes))}")
        return self.routes[target]

    def new_request_id(self) -> str:
        """An id for a request whose client sent none (echoed back, used in logs)."""
        return f"req-{next(self._ids)}-{time.time_ns() % 10**9}"

    @staticmethod
    def new_state_key() -> str:
        """The server-owned key of a request's state on the actors. Never derived from
        anything a client sends: two clients may pick the same request_id."""
        return f"s-{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ policy
    def plan(self, route: TargetRoute, req: RouteRequest) -> Plan:
        """Method, exit and draft length for one request: the planner's (speculation/plan.py),
        with a fallback (sorted on a draft without exits) logged once per target."""
        # it will share a target actor's forwards with the requests running there (per replica)
        concurrency = per_replica(route.running + 1, route.replicas)
        p = plan_request(route, req.method, max_draft_len=req.max_draft_len, draft_lens=route.draft_lens,
                         concurrency=concurrency)
        if p.fallback and route.name not in self._sorted_fallback_logged:
            self._sorted_fallback_logged.add(route.name)
            log.warning("target %s: method %s asked, but %s (see `tandem train-exits`); running %s instead",
                        route.name, req.method, p.fallback, p.method_name)
        return p

    def _without_draft(self, route: TargetRoute, req: RouteRequest) -> Plan:
        self.draftless += 1
        reason = "the draft pool's KV budget is full"
        (log.warning if self.draftless == 1 else log.debug)(
            "target %s: request %s runs with speculation off: %s (draft_pool.kv_budget_bytes; %d so far)",
            route.name, req.request_id, reason, self.draftless)
        return Plan(SpecConfig(method="ar", draft_len=1), req.method, observes=route.policy is not None, fallback=reason)

    # ------------------------------------------------------------------ generation
    async def generate(self, req: RouteRequest, *, cancelled: Callable[[], bool] = lambda: False) -> AsyncIterator[Delta]:
        """Admit, run and stream one request. Raises UnknownTargetError, QueueFullError,
        ValueError (bad field) before the first delta; SideUnavailableError on actor failure."""
        arrived = time.monotonic()  # telemetry: queue time, and TTFT / latency from arrival
        route = self.route(req.target)
        plan = self.plan(route, req)
        # the KV positions the actors allocate for it (actors/speculative.py sizes the caches so),
        # times the copies of its cache a round holds (SpecTr's branches)
        tokens = (len(req.prompt_ids) + req.max_new_tokens + context_reserve(plan.spec.draft_len)) * kv_copies(plan.spec)
        slot = await self.admission[route.name].admit(tokens)
        try:
            if plan.spec.method != "ar" and self.draft_budget is not None:
                # the draft actors hold as many positions; drafting is optional, so a request
                # whose draft KV does not fit now runs without a draft instead of waiting
                reserved = self.draft_budget.try_reserve(tokens)
                if reserved is None:
                    plan = self._without_draft(route, req)
                else:
                    slot.on_release(lambda: self.draft_budget.release(reserved))
            async for delta in self._run(route, req, plan, cancelled, slot, arrived=arrived):
                yield delta
        finally:
            if not slot.handed_over:  # no work was started: free the slot now
                slot.release()

    async def _run(
        self, route: TargetRoute, req: RouteRequest, plan: Plan, cancelled, slot: Slot,
        *, arrived: float | None = None,
    ) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        watcher = StopWatcher(route.tokenizer, req.stop)
        stop_flag = threading.Event()
        cancel_flag = threading.Event()
        stop_ids = set(req.stop_ids) | (set() if req.ignore_eos else set(route.eos_ids))
        spec, method_name = plan.spec, plan.method_name
        trace = None
        if self.telemetry is not None:
            sp = req.sampling
            trace = self.telemetry.request(
                request_id=req.request_id, target=route.name, method=method_name, prompt_tokens=len(req.prompt_ids),
                parent=req.trace_parent, arrived=arrived, model=route.model, operation=req.operation,
                max_tokens=req.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k or None, seed=sp.seed,
            )
            trace.__enter__()
        tracing = trace.actor_tracing() if trace is not None else None  # None unless rounds are sampled
        state_key = self.new_state_key()
        rounds = RoundPlanner(route, plan)
        # the engine's callbacks run on this event loop (engine.agenerate)
        def on_tokens(tokens: list[int]) -> None:
            queue.put_nowait(("tokens", list(tokens)))

        def on_logprobs(logprobs: list) -> None:  # queued just before the same commit's tokens
            queue.put_nowait(("logprobs", list(logprobs)))

        def on_round(info: dict) -> None:
            if trace is not None:
                trace.round(
                    index=info["index"],
                    start_ns=info["start_ns"],
                    end_ns=info["end_ns"],
                    drafted=info["drafted"],
                    accepted=info["accepted"],
                    emitted=info["emitted"],
                    exits=info["exits"],
                    exit_seq=info.get("exit_seq"),
                    step_rows=info.get("step_rows", 0),
                )
            rounds.observe(info)  # the goodput policy learns from the rounds the plan says it may

        def should_stop() -> str | None:
            if cancel_flag.is_set():
                return "cancelled"
            if stop_flag.is_set():
                return "stop"
            if req.deadline is not None and time.monotonic() > req.deadline:
                return "deadline"
            return None

        def replan() -> RoundPlan:
            # each round at the load of the moment: a burst's first requests, planned alone,
            # stop drafting while the others run beside them, and draft again once they leave
            return rounds.next(per_replica(route.running, route.replicas))

        replans = rounds.replans

        async def work() -> GenerationResult:
            try:
                return await self.engine.agenerate(
                    route.name,
                    list(req.prompt_ids),
                    spec=spec,
                    sampling=req.sampling,
                    max_new_tokens=req.max_new_tokens,
                    stop_ids=sorted(stop_ids),
                    on_tokens=on_tokens,
                    should_stop=should_stop,
                    on_round=on_round,
                    request_id=state_key,
                    **({"on_logprobs": on_logprobs} if req.sampling.logprobs is not None else {}),
                    **({"tracing": tracing} if tracing is not None else {}),
                    **({"round_plan": replan} if replans else {}),
                )
            finally:
                rounds.close()  # an arm this request was to try gets another trial where it saw too few rounds

        fut = loop.create_task(work(), name=f"request-{route.name}-{state_key}")
        self._tasks.add(fut)
        slot.handed_over = True  # from here the slot frees when the work ends, not when the client leaves
        slot.hold_kv(len(req.prompt_ids))
        fut.add_done_callback(lambda f: self._work_done(f, queue, slot))
        sent_tokens = 0
        pending_logprobs: list = []  # logprobs of tokens not yet taken from the queue
        first_sent = False
        finished = False
        try:
            while True:
                kind, payload = await queue.get()
                if cancelled():
                    cancel_flag.set()
                if kind == "logprobs":
                    pending_logprobs.extend(payload)
                    continue
                if kind == "tokens":
                    slot.hold_kv(len(payload))
                    ids, text = watcher.push(payload)
                    if watcher.stopped:
                        stop_flag.set()
                    logprobs = None
                    if req.sampling.logprobs is not None:
                        logprobs = pending_logprobs[: len(ids)]  # the watcher sends a prefix of payload
                        del pending_logprobs[: len(payload)]
                    if ids or text:
                        sent_tokens += len(ids)
                        if not first_sent and trace is not None:
                            trace.first_token()
                        first_sent = True
                        yield Delta(token_ids=ids, text=text, logprobs=logprobs)
                    continue
                # done
                finished = True
                try:
                    try:
                        result = fut.result()
                    except asyncio.CancelledError:  # Router.shutdown: the work closed on the actors, then stopped
                        raise SideUnavailableError(f"target {route.name!r}: the server shut down while the request ran",
                                                   role="target", emitted=sent_tokens) from None
                except SideUnavailableError as exc:
                    if trace is not None:
                        trace.finish(finish_reason="error", completion_tokens=sent_tokens, method=method_name, draft_len=spec.draft_len, error=str(exc))
                        trace = None
                    if sent_tokens:
                        yield Delta(
                            token_ids=[], text="", finish_reason="error", usage=self._usage(req, sent_tokens), error=str(exc)
                        )
                    raise
                _, tail = watcher.push([], final=True)
                reason = "stop" if watcher.stopped else result.finish_reason
                if reason == "eos" and result.tokens and result.tokens[-1] in set(req.stop_ids) - set(route.eos_ids):
                    reason = "stop"  # a stop token id the client asked for
                stats = self._stats(result, method_name, spec.draft_len)
                if trace is not None:
                    trace.finish(finish_reason=reason, completion_tokens=sent_tokens, method=method_name, draft_len=spec.draft_len)
                    trace = None
                seed = None if req.sampling.greedy else req.sampling.seed
                yield Delta(token_ids=[], text=tail, finish_reason=reason, usage=self._usage(req, sent_tokens), stats=stats, seed=seed)
                return
        finally:
            if not finished:
                # the client went away (cancel, deadline) while we streamed: stop the loop;
                # it closes the request on every actor at its next round
                cancel_flag.set()
                if trace is not None:
                    trace.finish(finish_reason="cancelled", completion_tokens=sent_tokens, method=method_name, draft_len=spec.draft_len)
                    trace = None
            if trace is not None:
                trace.__exit__(None, None, None)

    @staticmethod
    def _usage(req: RouteRequest, completion: int) -> dict:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": completion}

    @staticmethod
    def _stats(result: GenerationResult, method: str, draft_len: int) -> dict:
        s = result.stats
        return {
            "method": method,
            "draft_len": draft_len if method != "off" else 0,
            "rounds": s.rounds,
            "drafted": s.drafted,
            "accepted": s.accepted,
            "mean_accepted_len": s.mean_accepted_len,
            "acceptance_by_position": s.acceptance_by_position(),
            "exits_used": dict(s.exits_used),
        }

    def _work_done(self, task: asyncio.Task, queue: asyncio.Queue, slot: Slot) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # read by the stream when its client is still there; never logged as lost
        queue.put_nowait(("done", None))
        slot.release()

    @property
    def live_work(self) -> int:
        """Requests whose work is running on the engine (clients gone or not)."""
        return len(self._tasks)

    def shutdown(self) -> None:
        """Cancel the work still running (each closes its request on the actors first).
        Thread-safe; a no-op for work whose event loop has stopped."""
        for task in list(self._tasks):
            task_loop = task.get_loop()
            if task_loop.is_running() and not task_loop.is_closed():
                task_loop.call_soon_threadsafe(task.cancel)
