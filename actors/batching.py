"""Micro-batching for actors that serve many requests: calls arriving while the model is
busy are merged into one batched forward when it frees up (no waiting window: an idle
model starts at once, a busy one batches whatever queued up meanwhile)."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


@dataclass
class _Job:
    kind: str  # a batchable kind, or "call" for a one-off callable
    payload: Any
    future: Future = field(default_factory=Future)


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
    ):
        self.batch_fns = batch_fns
        self.max_batch = max_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.batches = 0
        self.batched_items = 0
        self._threads = [
            threading.Thread(target=self._run, args=(threads,), name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, kind: str, payload: Any) -> Future:
        if kind not in self.batch_fns:
            raise ValueError(f"unknown batch kind {kind!r}")
        job = _Job(kind=kind, payload=payload)
        self._queue.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        job = _Job(kind="call", payload=fn)
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

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.kind == "call":
                self._finish([job], lambda payloads: [payloads[0]()])
                continue
            jobs = self._take_more(job)
            with self._lock:
                self.batches += 1
                self.batched_items += len(jobs)
            self._finish(jobs, self.batch_fns[job.kind])

    @staticmethod
    def _finish(jobs: list[_Job], fn) -> None:
        try:
            results = fn([j.payload for j in jobs])
        except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
            for j in jobs:
                j.future.set_exception(exc)
            return
        for j, r in zip(jobs, results):
            if isinstance(r, BaseException):
                j.future.set_exception(r)
            else:
                j.future.set_result(r)
