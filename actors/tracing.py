"""Spans from inside the actors, carried back to the router.

A traced request's actor calls (open, draft, draft_branches, verify, verify_branches, steps) carry
`trace=`: the request's W3C trace context as a small carrier dict (what
`opentelemetry.propagate.inject` writes: {"traceparent": ...}). The actor then times its
work and answers `Traced(value, spans)` instead of the bare value; the router's side of the
call (actors/remote.py) unwraps it and hands the span records to the request's trace, which
re-creates them as child spans with their recorded start and end times
(services/telemetry.py).

Why records, not spans exported by each actor: an actor is another process (often another
node) whose TracerProvider, if any, is not the router's. Exporting there would need every
actor configured with the collector's endpoint, and spans from other processes never reach
an in-process exporter (tests, a router that only exports to its own backend). Records
travel inside the answer the router waits for anyway, so the actor spans land in the same
trace, through whatever exporter the router has, at the cost of a few hundred bytes per call.
Untraced calls (no `trace=`: the request's rounds are not sampled) take none of this path.

Timestamps are the actor's wall clock (time.time_ns()); across nodes they are as good as the
nodes' clock sync, as in any distributed trace.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TRACED_METHODS", "SpanRecord", "Traced", "call_record"]

# The actor methods that accept `trace=` (the SideHandle methods of a round and the prefill)
TRACED_METHODS = frozenset({"open", "draft", "draft_branches", "verify", "verify_branches", "steps"})

QUEUE_WAIT_SPAN = "tandem.actor.queue_wait"
FORWARD_SPAN = "tandem.actor.forward"


@dataclass
class SpanRecord:
    """One finished span: name, wall-clock epoch nanoseconds, attributes, nested children."""

    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    children: list[SpanRecord] = field(default_factory=list)


@dataclass
class Traced:
    """A traced actor call's answer: the method's value plus the spans it recorded."""

    value: Any
    spans: list[SpanRecord]


def call_record(name: str, *, role: str, arrived_ns: int, timing: dict | None, attributes: dict | None = None) -> SpanRecord:
    """The span of one actor call that went through a MicroBatcher: from its arrival to now,
    with a queue-wait child (arrival to the start of the batch that ran it) and a forward
    child (that batch's run) when `timing` (filled by MicroBatcher.submit/call) has them."""
    ended = time.time_ns()
    attrs = {"tandem.actor.role": role, "tandem.actor.pid": os.getpid(), **(attributes or {})}
    record = SpanRecord(name=name, start_ns=arrived_ns, end_ns=ended, attributes=attrs)
    started = (timing or {}).get("started_ns")
    if started is not None:
        started = min(max(int(started), arrived_ns), ended)
        finished = min(max(int(timing.get("finished_ns", ended)), started), ended)
        batch = int(timing.get("batch", 1))
        record.attributes["tandem.actor.batch_size"] = batch
        record.children = [
            SpanRecord(name=QUEUE_WAIT_SPAN, start_ns=arrived_ns, end_ns=started, attributes={"tandem.actor.role": role}),
            SpanRecord(name=FORWARD_SPAN, start_ns=started, end_ns=finished, attributes={"tandem.actor.role": role, "tandem.actor.batch_size": batch}),
        ]
    return record
