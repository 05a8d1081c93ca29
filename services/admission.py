"""Admission: which requests a target runs now, which wait, and which are refused.

One `Admission` per target. A request runs when both hold:
- fewer than `max_concurrent` requests of the target run (a running request is a task on
  the event loop, no thread; the bound keeps each actor's batch and the router's work
  per target in check), and
- its KV reservation fits the target's KV budget: `kv_bytes_per_token` x (prompt +
  max_new_tokens + the planner's context_reserve) x the copies of its cache a round holds
  (plan.kv_copies: SpecTr's k branches, else 1) against the budget of every serving
  replica together (`kv_budget_bytes` each, reported by the target actors: configured, else
  a share of their device's free memory). The verifier allocates a request's cache at that
  reservation once (actors/speculative.py), so what is admitted is what the actors hold.
Otherwise it waits, first in first out (a large request is not overtaken for ever by small
ones), within its deadline (gRPC cancels a waiter whose deadline passes), in a queue of
`queue_size`; past that it is refused with QueueFullError (RESOURCE_EXHAUSTED and a retry
delay). A request whose reservation exceeds one replica's budget could never run: it is
refused at once with a ValueError naming the field (INVALID_ARGUMENT). A running request's
place and reservation are freed when its work on the actors has ended (not merely when its
client left), so abandoned work counts against admission.

The draft pool serves every target, and its actors hold a KV cache per speculating request
too: `DraftBudget` reserves it (the draft's bytes per position x the same positions)
against the draft actors' budget. Drafting is optional, so a request whose draft KV does
not fit never waits for it: it runs with speculation off, which gives the same output.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

# Retry advice for a full queue (Admission.retry_after_s): the soonest a queue place frees is
# when one running request ends and the first waiting one takes its place. With requests
# running `mean` seconds on average (an EWMA of this target's recent requests; RETRY_PRIOR_S
# before any ended), one of max_concurrent running requests ends about every
# mean / max_concurrent seconds. Clamped: retrying sooner than RETRY_MIN_S only adds load,
# and past RETRY_MAX_S a client is better off looking elsewhere.
RETRY_PRIOR_S = 1.0
RETRY_MIN_S = 0.25
RETRY_MAX_S = 30.0
SLOT_EWMA_ALPHA = 0.2


class QueueFullError(RuntimeError):
    """More requests waiting than the queue admits; `retry_after_s` is when a place may
    have freed (Admission.retry_after_s)."""

    def __init__(self, message: str, *, target: str = "", retry_after_s: float = 1.0):
        super().__init__(message)
        self.target = target
        self.retry_after_s = retry_after_s


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class Slot:
    """One running request's place and KV reservation. Freed once: when the request ends
    before any work started, or when its work on the actors has ended."""

    def __init__(self, admission: "Admission", kv_bytes: int):
        self.admission = admission
        self.kv_bytes = kv_bytes  # reserved at admission
        self.handed_over = False
        self._held = True
        self._since = time.monotonic()
        self.kv_tokens = 0  # what this request adds to the route's kv_tokens (held, not reserved)
        self._on_release: list[Callable[[], None]] = []
        admission.route.running += 1

    def hold_kv(self, tokens: int) -> None:
        """The request's KV on the target grew by `tokens` positions (prompt, commits); ignored
        once the slot is released (the actors freed it)."""
        if self._held:
            self.kv_tokens += tokens
            self.admission.route.kv_tokens += tokens

    def release(self) -> None:
        if self._held:
            self._held = False
            self.admission._release(self, time.monotonic() - self._since)
            for fn in self._on_release:
                fn()

    def on_release(self, fn: Callable[[], None]) -> None:
        """Call fn once when the slot is freed (what else the request holds: its draft KV)."""
        self._on_release.append(fn)


class Admission:
    """Admission of one target's requests (see the module docstring). Runs on the event loop;
    `Slot.release` comes from the request task's done callback, on the same loop."""

    def __init__(self, route, *, max_concurrent: int, queue_size: int, replicas: Callable[[], int] | None = None):
        self.route = route
        self.max_concurrent = max_concurrent
        self.queue_size = queue_size
        self._replicas = replicas or (lambda: max(1, int(route.replicas)))
        self.kv_reserved = 0  # bytes reserved by running requests
        self._waiters: deque[tuple[asyncio.Future, int]] = deque()

    # ------------------------------------------------------------------ budget
    @property
    def kv_budget_total(self) -> int:
        """Bytes of KV the serving replicas hold together (0: no budget known: count only)."""
        return int(self.route.kv_budget_bytes) * max(1, self._replicas())

    def kv_need(self, tokens: int) -> int:
        """Bytes a request reserves for `tokens` KV positions (0 when the target's KV size is unknown)."""
        return int(tokens) * int(self.route.kv_bytes_per_token)

    def check_fits(self, tokens: int) -> int:
        """The reservation for `tokens` positions; ValueError naming the field when it exceeds
        one replica's whole budget (such a request could never run)."""
        need = self.kv_need(tokens)
        budget = int(self.route.kv_budget_bytes)
        if budget and need > budget:
            raise ValueError(
                f"sampling.max_new_tokens: prompt + max_new_tokens + draft blocks (x SpecTr's branches) need {tokens} KV positions "
                f"({mib(need)}); a replica of {self.route.name!r} holds at most {budget // self.route.kv_bytes_per_token} "
                f"({mib(budget)} KV budget)"
            )
        return need

    def _fits(self, need: int) -> bool:
        if self.route.running >= self.max_concurrent:
            return False
        total = self.kv_budget_total
        return not total or self.kv_reserved + need <= total or self.route.running == 0

    # ------------------------------------------------------------------ admission
    def retry_after_s(self) -> float:
        mean = self.route.mean_slot_s
        mean = RETRY_PRIOR_S if mean is None else mean
        return min(RETRY_MAX_S, max(RETRY_MIN_S, mean / self.max_concurrent))

    async def admit(self, tokens: int) -> Slot:
        """A running place with `tokens` KV positions reserved; waits for one (FIFO).
        Raises ValueError (can never fit) or QueueFullError (no room to wait)."""
        need = self.check_fits(tokens)
        route = self.route
        if not self._waiters and self._fits(need):
            return self._take(need)
        if route.waiting >= self.queue_size:
            held = f"; KV {mib(self.kv_reserved)} of {mib(self.kv_budget_total)} reserved" if self.kv_budget_total else ""
            raise QueueFullError(
                f"queue full: {route.waiting} requests waiting for target {route.name!r} "
                f"(queue_size {self.queue_size}; {route.running} running{held})",
                target=route.name,
                retry_after_s=self.retry_after_s(),
            )
        fut = asyncio.get_running_loop().create_future()
        entry = (fut, need)
        self._waiters.append(entry)
        route.waiting += 1
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # admitted just as it was cancelled: hand it back
                fut.result().release()
            else:
                self._waiters.remove(entry)
                self._wake()  # a smaller request behind it may fit now
            raise
        finally:
            route.waiting -= 1
        return fut.result()

    def _take(self, need: int) -> Slot:
        self.kv_reserved += need
        return Slot(self, need)

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][1]):
            fut, need = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._take(need))

    def _release(self, slot: Slot, held_s: float) -> None:
        r = self.route
        r.mean_slot_s = held_s if r.mean_slot_s is None else r.mean_slot_s + SLOT_EWMA_ALPHA * (held_s - r.mean_slot_s)
        r.running -= 1
        r.kv_tokens -= slot.kv_tokens
        self.kv_reserved -= slot.kv_bytes
        self._wake()


class DraftBudget:
    """KV reservations on the shared draft pool (see the module docstring): bytes per position
    and one actor's budget as the draft actors report them, times the serving draft actors.
    Not thread-safe: used on the router's event loop (a release may come through it)."""

    def __init__(self, *, kv_bytes_per_token: int, kv_budget_bytes: int, replicas: Callable[[], int] = lambda: 1):
        self.kv_bytes_per_token = int(kv_bytes_per_token)
        self.kv_budget_bytes = int(kv_budget_bytes)
        self._replicas = replicas
        self.kv_reserved = 0

    @property
    def kv_budget_total(self) -> int:
        return self.kv_budget_bytes * max(1, int(self._replicas()))

    def try_reserve(self, tokens: int) -> int | None:
        """Reserve `tokens` positions of draft KV: the bytes reserved, or None when they do not
        fit now (the request then runs without a draft)."""
        need = int(tokens) * self.kv_bytes_per_token
        if need > self.kv_budget_bytes or self.kv_reserved + need > self.kv_budget_total:
            return None
        self.kv_reserved += need
        return need

    def release(self, nbytes: int) -> None:
        self.kv_reserved -= int(nbytes)
