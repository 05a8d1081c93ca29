"""actors/steps.py: a request loop written once as a step generator, driven on a thread
(drive) or on an event loop without a thread (drive_async), with the same answers,
exceptions, waits and cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import Future

import pytest

from tandem.actors.steps import Sleep, TaskCancelled, drive, drive_async


class Answer:
    """A future in the Ray futures' shape (result() on a thread, wait() on a loop)."""

    def __init__(self, value=None, error: BaseException | None = None, delay_s: float = 0.0):
        self.value, self.error, self.delay_s = value, error, delay_s

    def result(self):
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.value

    async def wait(self):
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.value


def done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def loop(log: list, *, fail_at: int | None = None, slow: bool = False):
    """A request loop in miniature: open, rounds, a failing call caught (as a failed draft
    call is: the loop goes on without it), always close."""
    try:
        total = yield Answer(1)
        for i in range(3):
            if i == fail_at:
                try:
                    yield Answer(error=KeyError("lost"))
                except KeyError as exc:
                    log.append(f"caught {exc}")
                    continue
            try:
                total += yield (Answer(10, delay_s=0.2) if slow else done(10))
            except Exception:  # noqa: BLE001 - what a draft call's failure handling does
                log.append("swallowed")
                continue
            yield Sleep(0.001)
        return total
    finally:
        log.append("closing")
        log.append((yield Answer("closed")))


@pytest.mark.parametrize("fail_at", [None, 1])
def test_both_drivers_give_the_same_answers_and_cleanup(fail_at):
    a, b = [], []
    out_thread = drive(loop(a, fail_at=fail_at))
    out_loop = asyncio.run(drive_async(loop(b, fail_at=fail_at)))
    assert out_thread == out_loop == (21 if fail_at == 1 else 31)
    assert a == b and a[-2:] == ["closing", "closed"]
    assert ("caught 'lost'" in a) == (fail_at == 1)


def test_an_exception_the_loop_does_not_catch_comes_out_after_its_cleanup():
    def failing(log):
        try:
            yield Answer(error=ValueError("bad field"))
        finally:
            log.append((yield Answer("closed")))

    for run in (lambda g: drive(g), lambda g: asyncio.run(drive_async(g))):
        log: list = []
        with pytest.raises(ValueError, match="bad field"):
            run(failing(log))
        assert log == ["closed"]


def test_a_cancelled_task_runs_the_loops_cleanup_then_is_cancelled():
    log: list = []

    async def main():
        task = asyncio.create_task(drive_async(loop(log, slow=True)))
        await asyncio.sleep(0.05)  # inside the first slow round
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert log == ["closing", "closed"]  # not swallowed as a failed call, cleanup awaited

    # control: a driver that lets the cancellation out where it waits never runs the cleanup
    naive: list = []

    async def naive_drive(steps):
        value = None
        while True:
            step = steps.send(value)
            value = await step.wait()

    steps = loop(naive, slow=True)

    async def control():
        task = asyncio.create_task(naive_drive(steps))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(control())

    # control: thrown in as an Exception (RequestCancelledError was one), the loop's own
    # `except Exception` swallows it and the round goes on
    assert issubclass(TaskCancelled, BaseException) and not issubclass(TaskCancelled, Exception)
    swallowed: list = []
    steps2 = loop(swallowed, slow=True)
    steps2.send(None)
    steps2.send(1)  # now inside the first slow round
    nxt = steps2.throw(RuntimeError("cancelled, as an Exception"))
    assert swallowed == ["swallowed"] and isinstance(nxt, Answer) and nxt.value == 10  # the next round
    with contextlib.suppress(RuntimeError):
        steps2.close()

    with contextlib.suppress(RuntimeError):  # what the garbage collector would do: its close is never awaited
        steps.close()
    assert "closed" not in naive


def test_many_requests_on_one_loop_hold_no_thread_each():
    """64 loops waiting at once on the event loop: no thread is started for them (the
    router's way); the same 64 on threads (the old way, the control) hold 64."""
    before = threading.active_count()
    seen: list[int] = []

    async def main():
        async def sample():
            while True:
                seen.append(threading.active_count())
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(drive_async(loop([], slow=True)) for _ in range(64)))
        sampler.cancel()
        return results

    t0 = time.perf_counter()
    assert asyncio.run(main()) == [31] * 64
    assert time.perf_counter() - t0 < 3.0  # 64 x 0.6 s of waits overlapped, not in series
    assert max(seen) <= before

    from concurrent.futures import ThreadPoolExecutor

    held: list[int] = []
    before = threading.active_count()
    with ThreadPoolExecutor(64) as pool:
        futs = [pool.submit(drive, loop([], slow=True)) for _ in range(64)]
        time.sleep(0.1)
        held.append(threading.active_count())
        assert [f.result() for f in futs] == [31] * 64
    assert held[0] >= before + 48  # (other tests' threads may end meanwhile)
