"""The micro-batcher's gather window (actors/batching.py): after a batch, the model waits a
bounded while for that batch's requests that are still live, so requests that come back one
by one share the next forward instead of splitting it; a request that ended, was cancelled,
or runs alone is never waited for. A fake batch function (it records its batches and takes
RUN_S) stands in for the model."""

from __future__ import annotations

import threading
import time

import pytest

from tandem.actors.batching import MicroBatcher

RUN_S = 0.2  # what the fake batch takes: the last batch's run time the window scales
WINDOW_S = 5.0  # the cap in tests: far longer than any arrival, so a wait that happens shows


class FakeModel:
    def __init__(self):
        self.batches: list[list[str]] = []
        self.live: set[str] = set()
        self.lock = threading.Lock()

    def step(self, payloads):
        time.sleep(RUN_S)
        with self.lock:
            self.batches.append(list(payloads))
        return payloads


def batcher(model: FakeModel, gather: float) -> MicroBatcher:
    return MicroBatcher(
        {"step": model.step, "other": model.step}, threads=1, name="test", gather=gather, live=model.live.__contains__,
        gather_max_s=WINDOW_S,
    )


def first_batch(b: MicroBatcher, model: FakeModel, ids=("a", "b")) -> None:
    """Run one batch holding `ids` (queued together while the model is busy with a warm-up)."""
    model.live.update(ids)
    warm = b.submit("other", "warm")
    futures = [b.submit("step", f"{r}0", request_id=r) for r in ids]
    warm.result(timeout=10)
    for f in futures:
        f.result(timeout=10)
    assert model.batches[-1] == [f"{r}0" for r in ids]


@pytest.mark.parametrize("gather", [1.0, 0.0])
def test_requests_that_come_back_one_by_one_share_the_next_batch(gather):
    """b comes back 30 ms after a: with the window (1.0 x 0.2 s) they share a batch; the
    control without it (gather 0) runs a alone and b one batch later."""
    model = FakeModel()
    b = batcher(model, gather)
    try:
        first_batch(b, model)
        fa = b.submit("step", "a1", request_id="a")
        time.sleep(0.03)
        fb = b.submit("step", "b1", request_id="b")
        assert (fa.result(timeout=10), fb.result(timeout=10)) == ("a1", "b1")
        if gather:
            assert model.batches[-1] == ["a1", "b1"] and b.gathered == 1
        else:
            assert model.batches[-2:] == [["a1"], ["b1"]] and b.gathered == 0
    finally:
        b.close()


@pytest.mark.parametrize("reason", ["ended", "cancelled", "alone"])
def test_a_request_that_will_not_come_back_is_not_waited_for(reason):
    """After a batch of a and b, a comes back alone: b ended (not live) or was cancelled, so
    a runs at once, far inside the 5 s window. Alone: a batch of a only never waits."""
    model = FakeModel()
    b = batcher(model, 1000.0)  # 1000 x 0.2 s, capped at WINDOW_S
    try:
        first_batch(b, model, ("a",) if reason == "alone" else ("a", "b"))
        if reason == "ended":
            model.live.discard("b")
        elif reason == "cancelled":
            b.cancelled.cancel("b")
        t0 = time.monotonic()
        assert b.submit("step", "a1", request_id="a").result(timeout=10) == "a1"
        assert time.monotonic() - t0 < WINDOW_S / 2
        assert model.batches[-1] == ["a1"] and b.gathered == 0
    finally:
        b.close()


def test_a_live_request_that_does_not_come_back_costs_the_window_only():
    """The negative control of the test above: b still live and not cancelled, so a waits,
    and runs alone when the window (here 0.5 x 0.2 s) ends without b."""
    model = FakeModel()
    b = batcher(model, 0.5)
    try:
        first_batch(b, model)
        t0 = time.monotonic()
        assert b.submit("step", "a1", request_id="a").result(timeout=10) == "a1"
        waited = time.monotonic() - t0 - RUN_S
        assert 0.5 * RUN_S * 0.9 <= waited < WINDOW_S / 2
        assert model.batches[-1] == ["a1"]
    finally:
        b.close()


def test_work_of_another_kind_ends_the_wait_and_runs_next_in_order():
    """While a waits for b, a one-off call and then b arrive: the call ends the wait (a runs),
    then the call runs, then b: nothing is lost or reordered past its kind."""
    model = FakeModel()
    b = batcher(model, 1000.0)
    order: list[str] = []
    try:
        first_batch(b, model)
        fa = b.submit("step", "a1", request_id="a")
        time.sleep(0.05)
        fc = b.call(lambda: order.append("call") or "call")
        fb = b.submit("step", "b1", request_id="b")
        model.live.discard("a")  # a ended with a1 (still running), so b1 waits for nobody
        assert [f.result(timeout=10) for f in (fa, fc, fb)] == ["a1", "call", "b1"]
        assert model.batches[-2:] == [["a1"], ["b1"]] and order == ["call"]
    finally:
        b.close()


def test_gather_needs_one_worker_and_a_liveness_check():
    model = FakeModel()
    for kwargs in ({"workers": 2, "live": model.live.__contains__}, {"live": None}):
        b = MicroBatcher({"step": model.step}, threads=1, gather=0.5, **kwargs)
        assert b.gather == 0.0
        b.close()
    with pytest.raises(ValueError, match="gather"):
        MicroBatcher({"step": model.step}, threads=1, gather=-1.0)


def test_the_window_comes_from_the_environment_or_the_default(monkeypatch):
    from tandem.actors.batching import GATHER_FRACTION, gather_fraction

    monkeypatch.delenv("TANDEM_GATHER", raising=False)
    assert gather_fraction() == GATHER_FRACTION
    for raw, want in (("", GATHER_FRACTION), ("0", 0.0), ("0.5", 0.5)):
        monkeypatch.setenv("TANDEM_GATHER", raw)
        assert gather_fraction() == want
    for raw in ("-1", "nan", "soon"):
        monkeypatch.setenv("TANDEM_GATHER", raw)
        with pytest.raises(ValueError, match="TANDEM_GATHER must be a number >= 0"):
            gather_fraction()
