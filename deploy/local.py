"""`tandem generate --local`: the models in this process, behind the same request validation
(services/servicer.py parse), planner (speculation/plan.py) and router (services/router.py:
stop strings, deltas, stats) as the server, on an InProcessEngine (actors/local.py) instead
of the actor pools. A request that the server would refuse is refused here with the same
message, naming the same field.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable

from tandem.speculation.plan import DEFAULT_MAX_DRAFT_LEN


@dataclass
class LocalOutcome:
    """What one in-process request produced: its text, tokens, logprobs and last delta's
    outcome (finish_reason, usage, stats, seed), with its timing."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    stats: dict | None = None
    seed: int | None = None
    error: str | None = None
    total_s: float = 0.0
    ttft_s: float = 0.0


async def collect(router, req, on_delta: Callable[[Any], None] | None = None) -> LocalOutcome:
    """Run one parsed request through `router` and gather its deltas into a LocalOutcome."""
    out = LocalOutcome()
    t0 = time.perf_counter()
    async for delta in router.generate(req):
        if delta.token_ids and not out.token_ids:
            out.ttft_s = time.perf_counter() - t0
        out.text += delta.text
        out.token_ids.extend(delta.token_ids)
        out.logprobs.extend(delta.logprobs or [])
        if on_delta is not None:
            on_delta(delta)
        if delta.finish_reason is not None:
            out.finish_reason, out.usage, out.stats = delta.finish_reason, delta.usage, delta.stats
            out.seed, out.error = delta.seed, delta.error
    out.total_s = time.perf_counter() - t0
    return out


class _MeasuredLengths(Mapping):
    """An in-process engine's own draft lengths, measured on first use (the planner's
    draft_lens): sd and sorted get the length planned from the target's cost curve, PEARL
    its calibrated window (actors/local.py)."""

    def __init__(self, engine):
        self.engine = engine

    def __getitem__(self, method: str) -> int:
        if method in ("sd", "sorted"):
            return self.engine.default_draft_len("sd")
        if method == "pearl":
            return self.engine.split.window
        raise KeyError(method)

    def __iter__(self):
        return iter(("sd", "sorted", "pearl"))

    def __len__(self) -> int:
        return 3


class LocalServer:
    """One target (and its draft) in this process, served by the router. draft_len: an
    exact length for explicit methods (else each is planned for this target)."""

    def __init__(self, *, name: str, engine, tokenizer, eos_ids, sorted_policy=None, draft_len: int | None = None,
                 max_new_tokens_limit: int | None = None, default_max_new_tokens: int = 128):
        from tandem.actors.local import InProcessEngine
        from tandem.deploy.config import ServerConfig
        from tandem.services.router import Router, TargetRoute
        from tandem.services.servicer import TandemServicer

        has_draft = engine.drafter is not None
        if draft_len is not None:
            lengths: Mapping[str, int] = {m: int(draft_len) for m in ("sd", "sorted", "pearl", "spectr")}
        else:
            lengths = _MeasuredLengths(engine) if has_draft else {}
        self.route = TargetRoute(
            name=name, model=name, tokenizer=tokenizer, eos_ids=tuple(eos_ids), max_context=engine.target.max_context,
            vocab_size=engine.target.vocab_size, default_method="auto" if has_draft else "off",
            max_draft_len=max(DEFAULT_MAX_DRAFT_LEN, int(draft_len or 0)),
            # the engine's goodput policy: sequential rounds of the full draft priced with the
            # target's cost curve (measured here, once), then with its own rounds
            policy=engine.length_policy if has_draft and draft_len is None else None,
            sorted_policy=sorted_policy, draft_lens=lengths,
        )
        self.router = Router(InProcessEngine({name: engine}), {name: self.route}, max_concurrent=1, queue_size=1)
        limit = max_new_tokens_limit or ServerConfig().max_new_tokens_limit
        self.servicer = TandemServicer(self.router, max_new_tokens_limit=limit, default_max_new_tokens=default_max_new_tokens)
        self._loop = asyncio.new_event_loop()  # one loop for every request: the router's slots live on it

    def generate(self, on_delta: Callable[[Any], None] | None = None, **request) -> LocalOutcome:
        """build_generate_request's keywords (target included) -> the outcome; ValueError
        naming the field when the request is bad, exactly as the server words it."""
        from tandem.services.wire import build_generate_request

        msg = build_generate_request(**request)
        req = self.servicer.parse(msg, None)
        return self._loop.run_until_complete(collect(self.router, req, on_delta))

    def close(self) -> None:
        self._loop.close()
        self.servicer.shutdown()
        self.router.shutdown()
        self.router.engine.shutdown()
