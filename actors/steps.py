"""Request loops as step generators, and the two ways to drive them.

A request's loop (actors/speculative.py, and the engine's attempts around it in
actors/engine.py) is written once as a generator: where it needs an answer from a side it
yields the call's future and is sent back its value (or has its exception thrown in, so its
own try/except and finally run as in straight-line code); where it must wait it yields
Sleep(seconds). Nothing in a loop blocks.

- `drive(steps)`: on the calling thread; each future's `result()` blocks it. For callers
  that are threads anyway (the in-process engine, `tandem bench`, tests).
- `drive_async(steps)`: on an asyncio event loop; each future is awaited (`wait()` of the
  Ray futures in actors/remote.py, or a concurrent.futures.Future wrapped). Waiting
  requests take no thread each (tested with 64 loops, and 16 gRPC streams): the router runs
  every request of every target this way on the server's one event loop (issue 12:
  requests do not hold a thread each).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Generator

Steps = Generator[Any, Any, Any]  # yields futures or Sleep; returns the loop's result


class TaskCancelled(BaseException):
    """Thrown into a loop whose task was cancelled (drive_async). Not an Exception, so no
    `except Exception` in a loop (a failed draft call turning a request target-only, say)
    swallows it and goes on; the loop's finally blocks still run (closing the request on
    every side) before it comes out."""


@dataclass(frozen=True)
class Sleep:
    """Yielded by a loop that waits (for a replica to come back, say)."""

    seconds: float


def drive(steps: Steps) -> Any:
    """Run a step generator to its end on this thread; its return value."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as done:
            return done.value
        value, error = None, None
        try:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
            else:
                value = step.result()
        except Exception as exc:  # noqa: BLE001 - handed to the loop, which decides
            error = exc


async def _answer(step: Any) -> Any:
    if isinstance(step, Sleep):
        return await asyncio.sleep(step.seconds)
    if isinstance(step, concurrent.futures.Future):
        return await asyncio.wrap_future(step)
    return await step.wait()


async def drive_async(steps: Steps) -> Any:
    """Run a step generator to its end on the running event loop, without a thread.

    Cancelled (the task, e.g. at server shutdown): the loop gets TaskCancelled thrown in at
    the step it waits on, so its cleanup (closing the request on every side) still runs and
    is awaited; then CancelledError goes on up."""
    value: Any = None
    error: BaseException | None = None
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as done:
            if cancelled is not None:
                raise cancelled from None
            return done.value
        except BaseException as exc:
            if cancelled is not None:  # the loop let the cancellation out (after its cleanup)
                raise cancelled from exc
            raise
        value, error = None, None
        try:
            value = await _answer(step)
        except asyncio.CancelledError as exc:
            if cancelled is not None:  # cancelled again while cleaning up: give up
                with contextlib.suppress(RuntimeError):  # a loop that yields in its cleanup
                    steps.close()
                raise
            cancelled = exc
            error = TaskCancelled("the request's task was cancelled")
        except Exception as exc:  # noqa: BLE001 - handed to the loop, which decides
            error = exc
