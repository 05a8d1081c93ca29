"""Issue 12: requests do not hold a thread each. Through a real gRPC server on the session's
local Ray (tiny models), 16 streams at once run as tasks on the server's event loop
(engine.agenerate, actors/steps.py); the router process starts no thread for them, each
stream gets the target's own greedy text, and a server shut down with work still running
closes that work on the actors."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tandem.actors.speculative import SpecConfig
from tandem.services.client import AsyncTandemClient, TandemClient
from tests.service.conftest import ServerThread, service_config

PROMPT = "def x return y"
STREAMS = 16
TOKENS = 120


@pytest.fixture(scope="module")
def wide(ray_local, tiny_service_models):
    srv = ServerThread(service_config(tiny_service_models, max_concurrent=STREAMS, queue_size=STREAMS))
    yield srv
    srv.stop()


class Sampler:
    """Python threads in this process and the router's live work, every 5 ms."""

    def __init__(self, router):
        self.router = router
        self.threads: list[int] = []
        self.live: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.threads.append(threading.active_count())
            self.live.append(self.router.live_work)
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def streams(address: str, method: str) -> list[list[int]]:
    async def main():
        async with AsyncTandemClient(address) as c:
            outs = await asyncio.gather(*(
                c.generate(target="small", prompt=PROMPT, max_new_tokens=TOKENS, ignore_eos=True, method=method)
                for _ in range(STREAMS)
            ))
        return [o.token_ids for o in outs]

    return asyncio.run(main())


def test_sixteen_streams_hold_no_thread_each(wide):
    with TandemClient(wide.address) as c:
        reference = c.generate(target="small", prompt=PROMPT, max_new_tokens=TOKENS, ignore_eos=True, method="off").token_ids
    streams(wide.address, "sd")  # warm-up: the server's fixed threads (parsing, gRPC) start once
    with Sampler(wide.app.router) as sampled:
        base = sampled.threads[0]
        outs = streams(wide.address, "sd")
    assert outs == [reference] * STREAMS  # lossless with 16 in flight
    assert max(sampled.live) >= STREAMS * 3 // 4, max(sampled.live)  # they ran at once
    assert max(sampled.threads) <= base + 2, (base, max(sampled.threads))

    # control: the same requests on the engine's blocking path, one thread each (the router's
    # way before), are seen by the same count
    engine = wide.engine
    ids = wide.app.router.routes["small"].tokenizer.encode(PROMPT)
    base = threading.active_count()
    peak: list[int] = []
    with ThreadPoolExecutor(STREAMS) as pool:
        futs = [pool.submit(engine.generate, "small", ids, spec=SpecConfig(method="sd", draft_len=3), max_new_tokens=TOKENS)
                for _ in range(STREAMS)]
        while not all(f.done() for f in futs):
            peak.append(threading.active_count())
            time.sleep(0.005)
        [f.result() for f in futs]
    assert max(peak) >= base + STREAMS * 3 // 4


def test_work_still_running_at_shutdown_closes_on_the_actors(ray_local, tiny_service_models):
    """Router.shutdown cancels the tasks; each closes its request on every actor first."""
    srv = ServerThread(service_config(tiny_service_models, max_concurrent=4, queue_size=4))
    try:
        router, engine = srv.app.router, srv.engine

        async def start_and_shut_down():
            state = {}
            async with AsyncTandemClient(srv.address) as c:
                async def one():
                    try:
                        await c.generate(target="small", prompt=PROMPT, max_new_tokens=4000, ignore_eos=True, method="pearl")
                    except Exception as exc:  # noqa: BLE001 - the server ends it
                        state.setdefault("errors", []).append(exc)

                calls = [asyncio.create_task(one()) for _ in range(3)]
                for _ in range(600):
                    if router.live_work == 3 and len(engine.live_requests().get("small/0", [])) == 3:
                        break
                    await asyncio.sleep(0.05)
                state["live_before"] = engine.live_requests()
                router.shutdown()  # thread-safe: the tasks are cancelled on the server loop
                for _ in range(600):
                    if router.live_work == 0:
                        break
                    await asyncio.sleep(0.05)
                state["live_work_after"] = router.live_work
                state["live_after"] = engine.live_requests()
                await asyncio.wait_for(asyncio.gather(*calls), 60)
            return state

        state = asyncio.run(start_and_shut_down())
        assert len(state["live_before"]["small/0"]) == 3, state
        assert len(state["errors"]) == 3 and all(e.code.name == "UNAVAILABLE" for e in state["errors"]), state["errors"]
        assert state["live_work_after"] == 0, state
        assert all(v == [] for v in state["live_after"].values()), state["live_after"]
    finally:
        srv.stop()
