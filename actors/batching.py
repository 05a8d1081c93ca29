"""Micro-batching for actors that serve many requests: calls arriving while the model is
busy are merged into one batched forward when it frees up. An idle model starts at once,
unless requests of its last batch are still live and not yet back: then it gathers them
for a short window first (`gather`, below)."""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from tandem.actors.devices import thread_initializer
from tandem.actors.speculative import RequestCancelledError

if TYPE_CHECKING:
    from tandem.actors.core_turns import CoreTurns


# Prompt tokens per prefill chunk, on targets and drafts alike. A target's chunk rides in one
# batched forward with the other requests' verification blocks (Verifier.step); a draft's
# catch-up over a long prompt runs a chunk per batch between the other requests' drafts
# (DraftWorker.draft). So it bounds how long a long prompt stalls the others: on the 1.5B pack
# (AVX2, 2 threads) a 128-row chunk cost 4.8 s against 33 s for a whole 256-token prompt, and
# the prompt itself prefilled fastest at 128 (docs/deploy.md, bench/chunked_prefill.py). A
# cancelled request stops between chunks.
PREFILL_CHUNK = 128


class Cancellations:
    """Request keys whose work an actor drops: queued calls fail with RequestCancelledError
    before they run, and a long prefill stops between chunks. Thread-safe. A key stays
    until the request is closed here, or for `ttl_s` (a cancel may arrive before the open
    it cancels, or for a request that never reaches this actor)."""

    def __init__(self, ttl_s: float = 600.0):
        self.ttl_s = ttl_s
        self._keys: dict[str, float] = {}
        self._lock = threading.Lock()

    def cancel(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._keys[key] = now
            for k in [k for k, t in self._keys.items() if now - t > self.ttl_s]:
                del self._keys[k]

    def discard(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def check(self, key: str) -> None:
        """Raise RequestCancelledError if `key` was cancelled."""
        if key in self._keys:
            raise RequestCancelledError(f"request {key!r} was cancelled")


@dataclass
class _Job:
    kind: str  # a batchable kind, or "call" for a one-off callable
    payload: Any
    request_id: str | None = None  # whose work this is (dropped once that request is cancelled)
    future: Future = field(default_factory=Future)
    timing: dict | None = None  # traced calls: filled with started_ns, finished_ns, batch (actors/tracing.py)


# The gather window, as a fraction of the last batch's own run time. The requests of a batch
# come back one by one (each answer crosses Ray to the router, which streams it and sends the
# next call), so an idle model that started on the first to return would run it alone and
# batch the rest one forward later: a forward of 1 row and one of 7 where one of 8 would do.
# Measured through gRPC on the 2-core AMX host (1.5B pack, 8 requests in flight, off): the
# forward of 8 one-row requests cost 165 ms and of one 58 ms, and without the window the
# target split its batches (4.6 rows a forward, rows-weighted), so tokens came at 27 tok/s
# where 8/0.165 s is 48; with it, 7.4 rows and 34 tok/s (docs/deploy.md, "Gathering a
# batch"). Bounded by this fraction of the batch that ran, a wait never costs more than that
# share of a step.
GATHER_FRACTION = 0.25
GATHER_MAX_S = 0.05  # and never longer than this (after a long prefill chunk, say)


def gather_fraction() -> float:
    """GATHER_FRACTION, or TANDEM_GATHER from the environment (0 turns the window off)."""
    raw = os.environ.get("TANDEM_GATHER") or ""
    if not raw:
        return GATHER_FRACTION
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"TANDEM_GATHER must be a number >= 0, got {raw!r}")
    return value


class MicroBatcher:
    """Runs jobs on `workers` threads, each with `threads` torch threads.

    batch_fns: {kind: fn(list of payloads) -> list of results}; jobs of one kind queued
    together run as one batch (up to max_batch). Any other work goes through `call`, alone.
    With several workers (a pipeline front), several batches are in flight at once.

    gather: with one worker, before a batch runs it waits up to `gather` x the last batch's
    run time (at most gather_max_s) for the requests of that batch that are still live
    (`live(request_id)`), not cancelled and not queued yet; 0 runs at once. A request that
    ended, or any not in the last batch, is never waited for, so one request alone never
    waits. turns: a CoreTurns (actors/core_turns.py); each batch then runs in its turn.
    """

    def __init__(
        self,
        batch_fns: dict[str, Callable[[list[Any]], Sequence[Any]]],
        *,
        threads: int,
        workers: int = 1,
        max_batch: int = 16,
        name: str = "batcher",
        cancelled: Cancellations | None = None,
        gather: float = 0.0,
        live: Callable[[str], bool] | None = None,
        gather_max_s: float = GATHER_MAX_S,
        turns: CoreTurns | None = None,
    ):
        if gather < 0:
            raise ValueError(f"gather must be >= 0, got {gather}")
        self.batch_fns = batch_fns
        self.gather = gather if workers == 1 and live is not None else 0.0
        self._live = live
        self.turns = turns
        self._one_worker = workers == 1
        self.gather_max_s = gather_max_s
        self._held: collections.deque[_Job | None] = collections.deque()  # taken while gathering, run next
        self._last: tuple[str, set[str], float] | None = None  # the last batch: kind, requests, run seconds
        self.gathered = 0  # jobs a batch took in while gathering (they would have run a forward later)
        self.cancelled = cancelled if cancelled is not None else Cancellations()
        self.max_batch = max_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.batches = 0
        self.batched_items = 0
        self.default_device = torch.get_default_device()  # what the worker threads run with
        init = thread_initializer(threads)  # torch threads, and this thread's default device
        self._threads = [
            threading.Thread(target=self._run, args=(init,), name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, kind: str, payload: Any, *, request_id: str | None = None, timing: dict | None = None) -> Future:
        """Queue one item of a batchable kind. `timing`, when given, is filled with when its
        batch started and finished (epoch ns) and the batch's size, before the future resolves."""
        if kind not in self.batch_fns:
            raise ValueError(f"unknown batch kind {kind!r}")
        job = _Job(kind=kind, payload=payload, request_id=request_id, timing=timing)
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any], *, request_id: str | None = None, timing: dict | None = None) -> Future:
        job = _Job(kind="call", payload=fn, request_id=request_id, timing=timing)
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def _next(self, timeout: float | None = None) -> _Job | None:
        """The next job: one held back while gathering first, else from the queue (blocking;
        with `timeout`, queue.Empty after it; 0: without waiting)."""
        if self._held:
            return self._held.popleft()
        if timeout is None:
            return self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _take_more(self, first: _Job) -> list[_Job]:
        """The first job plus queued jobs of the same kind; the first of another kind that
        ends the run is put back (with one worker, ahead of the queue: nothing is reordered)."""
        jobs, others = [first], []
        while len(jobs) < self.max_batch:
            try:
                job = self._next(0)
            except queue.Empty:
                break
            if job is None or job.kind != first.kind:
                others.append(job)
                break  # keep order: stop at the first job of another kind
            jobs.append(job)
        for job in others:
            if self._one_worker:
                self._held.appendleft(job)  # it runs next, before anything queued after it
            else:
                self._queue.put(job)  # an idle worker may take it now
        return jobs

    def _gather(self, jobs: list[_Job]) -> list[_Job]:
        """Add to `jobs` the last batch's requests that are still live and come back within the
        window; a job of another kind (or the stop sentinel) arriving meanwhile ends the wait
        and runs after this batch."""
        if not self.gather or self._held or self._last is None or self._last[0] != jobs[0].kind:
            return jobs  # (held: other work is due next, so nothing waits)
        kind, members, run_s = self._last
        have = {j.request_id for j in jobs}
        waiting = {r for r in members if r not in have and r not in self.cancelled and self._live(r)}
        deadline = time.monotonic() + min(self.gather * run_s, self.gather_max_s)
        while waiting and len(jobs) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                job = self._next(left)
            except queue.Empty:
                break
            if job is None or job.kind != kind:
                self._held.append(job)
                break
            if self._drop_if_cancelled(job):
                continue
            jobs.append(job)
            self.gathered += 1
            waiting.discard(job.request_id)
        return jobs

    def _run(self, init: Callable[[], None]) -> None:
        init()
        while True:
            job = self._next()
            if job is None:
                return
            if self._drop_if_cancelled(job):
                continue
            if job.kind == "call":
                self._finish([job], lambda payloads: [payloads[0]()])
                continue
            jobs = [j for j in self._take_more(job) if not self._drop_if_cancelled(j)]
            if not jobs:
                continue
            jobs = self._gather(jobs)
            with self._lock:
                self.batches += 1
                self.batched_items += len(jobs)
            run_s = self._finish(jobs, self.batch_fns[job.kind])
            if self.gather:
                self._last = (job.kind, {j.request_id for j in jobs if j.request_id is not None}, run_s)

    def _drop_if_cancelled(self, job: _Job) -> bool:
        """Fail a queued job of a cancelled request instead of running it."""
        if job.request_id is None or job.request_id not in self.cancelled:
            return False
        job.future.set_exception(RequestCancelledError(f"request {job.request_id!r} was cancelled"))
        return True

    def _finish(self, jobs: list[_Job], fn) -> float:
        """Run fn over the jobs' payloads (in the node's turn, with turns) and resolve their
        futures; returns the seconds fn ran (not counting the wait for the turn)."""
        try:
            with self.turns.turn() if self.turns is not None else contextlib.nullcontext():
                started, t0 = time.time_ns(), time.perf_counter()
                results = fn([j.payload for j in jobs])
                run_s = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
            for j in jobs:
                j.future.set_exception(exc)
            return 0.0
        finished = time.time_ns()
        for j in jobs:
            if j.timing is not None:
                j.timing.update(started_ns=started, finished_ns=finished, batch=len(jobs))
        for j, r in zip(jobs, results):
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)
        return run_s
