"""Micro-batching for actors that serve many requests: calls arriving while the model is
busy are merged into one batched forward when it frees up (no waiting window: an idle
model starts at once, a busy one batches whatever queued up meanwhile)."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from tandem.actors.devices import thread_initializer
from tandem.actors.speculative import RequestCancelledError


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


class MicroBatcher:
    """Runs jobs on `workers` threads, each with `threads` torch threads.

    batch_fns: {kind: fn(list of payloads) -> list of results}; jobs of one kind queued
    together run as one batch (up to max_batch). Any other work goes through `call`, alone.
    With several workers (a pipeline front), several batches are in flight at once.
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
    ):
        self.batch_fns = batch_fns
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

    def _take_more(self, first: _Job) -> list[_Job]:
        """The first job plus queued jobs of the same kind (others are put back in order)."""
        jobs, others = [first], []
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None or job.kind != first.kind:
                others.append(job)
                break  # keep order: stop at the first job of another kind
            jobs.append(job)
        for job in others:
            self._queue.put(job)
        return jobs

    def _run(self, init: Callable[[], None]) -> None:
        init()
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._drop_if_cancelled(job):
                continue
            if job.kind == "call":
                self._finish([job], lambda payloads: [payloads[0]()])
                continue
            jobs = [j for j in self._take_more(job) if not self._drop_if_cancelled(j)]
            with self._lock:
                self.batches += 1
                self.batched_items += len(jobs)
            self._finish(jobs, self.batch_fns[job.kind])

    def _drop_if_cancelled(self, job: _Job) -> bool:
        """Fail a queued job of a cancelled request instead of running it."""
        if job.request_id is None or job.request_id not in self.cancelled:
            return False
        job.future.set_exception(RequestCancelledError(f"request {job.request_id!r} was cancelled"))
        return True

    @staticmethod
    def _finish(jobs: list[_Job], fn) -> None:
        started = time.time_ns()
        try:
            results = fn([j.payload for j in jobs])
        except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
            for j in jobs:
                j.future.set_exception(exc)
            return
        finished = time.time_ns()
        for j in jobs:
            if j.timing is not None:
                j.timing.update(started_ns=started, finished_ns=finished, batch=len(jobs))
        for j, r in zip(jobs, results):
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)
