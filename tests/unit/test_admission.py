"""services/admission.py: admission by KV reservation, FIFO waits, a bounded queue."""

from __future__ import annotations

import asyncio

import pytest

from tandem.services.admission import Admission, QueueFullError
from tandem.services.router import TargetRoute

BPT = 1000  # bytes per KV position


def route(budget: int = 100 * BPT, bpt: int = BPT) -> TargetRoute:
    return TargetRoute(
        name="t", model="m", tokenizer=None, eos_ids=(), max_context=4096, vocab_size=10, default_method="off",
        max_draft_len=4, policy=None, kv_bytes_per_token=bpt, kv_budget_bytes=budget,
    )


def run(coro):
    return asyncio.run(coro)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_requests_that_fit_run_together_and_one_past_the_budget_waits_for_room():
    async def main():
        a = Admission(route(), max_concurrent=8, queue_size=4)
        first = await a.admit(60)
        second_task = asyncio.create_task(a.admit(50))  # 60 + 50 > 100 positions: waits
        await settle()
        assert not second_task.done() and a.route.waiting == 1 and a.kv_reserved == 60 * BPT
        first.release()
        second = await asyncio.wait_for(second_task, 1)
        assert a.kv_reserved == 50 * BPT and a.route.running == 1 and a.route.waiting == 0
        second.release()
        assert a.kv_reserved == 0 and a.route.running == 0

    run(main())


def test_waiting_is_first_in_first_out_so_a_large_request_is_not_starved():
    async def main():
        a = Admission(route(), max_concurrent=8, queue_size=4)
        first = await a.admit(60)
        large = asyncio.create_task(a.admit(90))
        await settle()
        small = asyncio.create_task(a.admit(20))  # 60 + 20 fits, but the large one came first
        await settle()
        assert not large.done() and not small.done()
        first.release()
        big = await asyncio.wait_for(large, 1)
        await settle()
        assert not small.done()  # 90 + 20 does not fit: it runs after the large one
        big.release()
        (await asyncio.wait_for(small, 1)).release()
        # control: without the large request ahead, the small one runs at once
        b = Admission(route(), max_concurrent=8, queue_size=4)
        held = await b.admit(60)
        assert (await asyncio.wait_for(b.admit(20), 1)).kv_bytes == 20 * BPT
        held.release()

    run(main())


def test_a_full_queue_refuses_with_a_retry_delay_and_a_cancelled_waiter_frees_its_place():
    async def main():
        a = Admission(route(), max_concurrent=1, queue_size=1)
        running = await a.admit(10)
        waiter = asyncio.create_task(a.admit(10))
        await settle()
        with pytest.raises(QueueFullError) as info:
            await a.admit(10)
        assert "queue full" in str(info.value) and "queue_size 1" in str(info.value)
        assert info.value.retry_after_s > 0
        waiter.cancel()
        await settle()
        assert a.route.waiting == 0
        third = asyncio.create_task(a.admit(10))  # the cancelled waiter's place is free again
        await settle()
        assert a.route.waiting == 1
        running.release()
        (await asyncio.wait_for(third, 1)).release()
        assert a.route.running == 0 and a.kv_reserved == 0

    run(main())


def test_a_request_larger_than_one_replicas_budget_is_refused_naming_the_field():
    async def main():
        a = Admission(route(), max_concurrent=8, queue_size=4, replicas=lambda: 4)
        assert a.kv_budget_total == 400 * BPT
        with pytest.raises(ValueError, match=r"^sampling\.max_new_tokens: .*101 KV positions.*holds at most 100"):
            await a.admit(101)  # 4 replicas hold 400 positions, but one request lands on one
        (await a.admit(100)).release()  # control: exactly one replica's budget runs

    run(main())


def test_the_budget_grows_with_serving_replicas():
    async def main():
        replicas = {"n": 1}
        a = Admission(route(), max_concurrent=8, queue_size=4, replicas=lambda: replicas["n"])
        first = await a.admit(80)
        waiting = asyncio.create_task(a.admit(80))
        await settle()
        assert not waiting.done()
        replicas["n"] = 2  # a replica joined: room for both, taken at the next release or admit
        first.release()
        second = await asyncio.wait_for(waiting, 1)
        third = await asyncio.wait_for(a.admit(80), 1)  # 160 of 200 positions
        assert a.kv_reserved == 160 * BPT
        second.release()
        third.release()

    run(main())


def test_without_a_known_kv_size_admission_counts_requests_only():
    async def main():
        a = Admission(route(budget=0, bpt=0), max_concurrent=2, queue_size=4)
        x, y = await a.admit(10**6), await a.admit(10**6)
        z = asyncio.create_task(a.admit(1))
        await settle()
        assert not z.done()  # the third waits for a running place, not for bytes
        x.release()
        (await asyncio.wait_for(z, 1)).release()
        y.release()

    run(main())


def test_draft_budget_reserves_what_fits_and_refuses_without_waiting():
    from tandem.services.admission import DraftBudget

    replicas = [1]
    b = DraftBudget(kv_bytes_per_token=100, kv_budget_bytes=1000, replicas=lambda: replicas[0])
    first = b.try_reserve(6)
    assert first == 600 and b.kv_reserved == 600
    assert b.try_reserve(5) is None and b.kv_reserved == 600  # 1100 > 1000: refused at once, nothing held
    assert b.try_reserve(4) == 400  # the control: what fits is reserved
    b.release(first)
    assert b.kv_reserved == 400
    replicas[0] = 3  # three draft actors hold three budgets ...
    assert b.kv_budget_total == 3000 and b.try_reserve(10) == 1000
    assert b.try_reserve(11) is None  # ... but one request's KV lives on one actor
