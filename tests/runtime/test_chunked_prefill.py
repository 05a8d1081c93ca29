"""Chunked prefill (issue 12): a target feeds a prompt a chunk per step, inside the batched
forward that verifies the other requests, so a long prompt never stalls their decoding; a
draft catches up on a long prompt a chunk per batch, between the other requests' drafts.

Checked on the tiny float32 target: mixing chunks into verification changes no result
(greedy tokens, the prompt's next-token logits); a worker's decoders keep stepping while a
prompt prefills, with a whole-prompt chunk as the negative control that stalls them; bad,
cancelled and too-long prompts leave no request or KV behind."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tandem.actors.drafter import DraftBlock
from tandem.actors.kv_cache import ContextLengthError
from tandem.actors.speculative import RequestCancelledError
from tandem.actors.tracing import Traced
from tandem.actors.verifier import Verifier
from tandem.actors.workers import DraftWorker, ModelLoad, TargetWorker
from tandem.speculation.sampling import SamplingParams

GREEDY = SamplingParams()
LONG = [(3 * i + 1) % 6 for i in range(40)]  # 40 tokens of the tiny vocabulary (6)


def _verifier(path: str, chunk: int) -> Verifier:
    return Verifier(ModelLoad(path=path, dtype="float32").build(), prefill_chunk=chunk)


def test_prefill_chunks_mixed_into_verification_change_nothing(tiny_paths):
    """Two requests verify blocks while a third's 40-token prompt is fed 4 tokens a step in
    the same forwards; against the same work done one after the other, every committed token
    and the third request's next-token logits are the same."""
    block = DraftBlock(tokens=[1, 2], q=None, exits=[0, 0])
    # reference: the prompt prefilled alone first, then the same verification steps
    ref = _verifier(tiny_paths[0], chunk=4)
    for key in ("a", "b"):
        ref.open(key, [0, 1, 2, 3], sampling=GREEDY)
    ref.open("c", LONG, sampling=GREEDY)
    want_pending = ref.requests["c"].pending.clone()
    want = [[o.tokens for o in ref.verify_batch(["a", "b"], [block, None])] for _ in range(6)]

    mixed = _verifier(tiny_paths[0], chunk=4)
    for key in ("a", "b"):
        mixed.open(key, [0, 1, 2, 3], sampling=GREEDY)
    mixed.begin("c", LONG, sampling=GREEDY)
    got, lefts, rows = [], [], []
    for _ in range(6):
        outs, (left,) = mixed.step(["a", "b"], [block, None], prefills=["c"])
        got.append([o.tokens for o in outs])
        lefts.append(left)
        rows.append(outs[0].step_rows)
    assert got == want
    assert lefts == [36, 32, 28, 24, 20, 16]
    assert min(rows) >= 4 + 2  # the chunk's rows ran in the verification forward
    # the request cannot be verified until its prompt is all fed
    with pytest.raises(RuntimeError, match="still prefilling"):
        mixed.verify("c", None)
    while left:
        _, (left,) = mixed.step([], [], prefills=["c"])
    assert not mixed.requests["c"].prefilling
    assert torch.allclose(mixed.requests["c"].pending.cpu(), want_pending.cpu(), atol=1e-4)
    assert mixed.verify("c", None).tokens == ref.verify("c", None).tokens


def test_a_prompt_past_the_context_is_refused_before_any_forward(tiny_paths):
    v = _verifier(tiny_paths[0], chunk=4)
    forwards = v.runner.timings.forwards
    with pytest.raises(ContextLengthError, match="exceeds the target's context"):
        v.begin("long", [1] * (v.runner.max_context + 1), sampling=GREEDY)
    with pytest.raises(ValueError, match="at least one token"):
        v.begin("empty", [], sampling=GREEDY)
    assert v.requests == {} and v.runner.timings.forwards == forwards


def test_a_request_cancelled_between_chunks_stops_and_frees(tiny_paths):
    v = _verifier(tiny_paths[0], chunk=4)
    v.begin("c", LONG, sampling=GREEDY)
    _, (left,) = v.step([], [], prefills=["c"])
    assert left == 36
    v.cancelled.cancel("c")
    forwards = v.runner.timings.forwards
    _, (err,) = v.step([], [], prefills=["c"])
    assert isinstance(err, RequestCancelledError) and v.runner.timings.forwards == forwards
    v.drop("c")
    assert v.requests == {} and "c" in v.cancelled  # still marked: queued work keeps failing
    # open() frees by itself: a cancelled request leaves no state
    with pytest.raises(RequestCancelledError):
        v.open("c", LONG, sampling=GREEDY)
    assert v.requests == {}


def _decode_during_open(path: str, chunk: int) -> tuple[int, TargetWorker, Traced]:
    """One decoder steps (empty blocks) on a worker in a loop while another request's
    40-token prompt is opened; returns how many decoder steps finished during the open."""
    w = TargetWorker(ModelLoad(path=path, dtype="float32"), prefill_chunk=chunk)
    w.open("d", [0, 1, 2, 3], sampling=GREEDY)
    stop, done = threading.Event(), []

    def decode():
        for _ in range(400):  # bounded: the tiny context holds 512 positions
            if stop.is_set():
                return
            w.verify("d", None)
            done.append(time.perf_counter())

    t = threading.Thread(target=decode, daemon=True)
    t.start()
    while len(done) < 3:
        time.sleep(0.001)
    t0 = time.perf_counter()
    traced = w.open("p", LONG, sampling=GREEDY, trace={})
    t1 = time.perf_counter()
    stop.set()
    t.join(30)
    return sum(t0 <= x <= t1 for x in done), w, traced


def test_decoders_keep_stepping_while_a_prompt_prefills(tiny_paths):
    steps, w, traced = _decode_during_open(tiny_paths[0], chunk=4)
    assert isinstance(traced, Traced) and traced.spans[0].attributes["tandem.prefill.chunks"] == 10
    assert steps >= 4, f"only {steps} decoder steps during a 10-chunk prefill"
    # (on this tiny model a forward is too short for both to queue: they take turns; on a
    # real one they share forwards, counted in mixed_steps - bench/chunked_prefill.py)
    assert w.info()["mixed_steps"] == w.mixed_steps
    assert not w.verifier.requests["p"].prefilling
    # negative control: the prompt as one chunk is one forward; the decoder waits it out
    steps, w, traced = _decode_during_open(tiny_paths[0], chunk=len(LONG))
    assert traced.spans[0].attributes["tandem.prefill.chunks"] == 1
    assert steps <= 3 and w.mixed_steps <= 1, (steps, w.mixed_steps)


def test_a_cancel_before_open_runs_no_forward_and_leaves_nothing(tiny_paths):
    w = TargetWorker(ModelLoad(path=tiny_paths[0], dtype="float32"), prefill_chunk=4)
    w.cancel("x")
    batches = w.batcher.batches
    with pytest.raises(RequestCancelledError):
        w.open("x", LONG, sampling=GREEDY)
    assert w.verifier.requests == {} and w.kv_bytes_used() == 0
    assert w.batcher.batches == batches


def _draft_during_catch_up(path: str, chunk: int) -> tuple[int, list[int]]:
    """One request drafts in a loop on a draft worker while another's first draft call
    catches up on a 40-token prompt; returns the loop's drafts finished during that call
    and the long request's drafted tokens."""
    w = DraftWorker(ModelLoad(path=path, dtype="float32"), prefill_chunk=chunk)
    for key in ("d", "p"):
        w.open(key, sampling=GREEDY)
    stop, done = threading.Event(), []

    def drafting():
        for _ in range(400):
            if stop.is_set():
                return
            w.draft("d", [0, 1, 2, 3], draft_len=2)
            done.append(time.perf_counter())

    t = threading.Thread(target=drafting, daemon=True)
    t.start()
    while len(done) < 3:
        time.sleep(0.001)
    t0 = time.perf_counter()
    block = w.draft("p", LONG, draft_len=3)
    t1 = time.perf_counter()
    stop.set()
    t.join(30)
    assert w.live_requests() == ["d", "p"]
    return sum(t0 <= x <= t1 for x in done), block.tokens


def test_a_draft_catches_up_on_a_long_prompt_between_other_drafts(tiny_paths):
    steps, chunked = _draft_during_catch_up(tiny_paths[1], chunk=4)
    assert steps >= 4, f"only {steps} drafts of the other request during a 10-chunk catch-up"
    # negative control: the prompt fed in the draft call itself holds the other request
    steps, whole = _draft_during_catch_up(tiny_paths[1], chunk=len(LONG))
    assert steps <= 3, steps
    assert chunked == whole  # the same draft either way


def test_a_cancelled_catch_up_stops_between_chunks(tiny_paths):
    w = DraftWorker(ModelLoad(path=tiny_paths[1], dtype="float32"), prefill_chunk=4)
    w.open("p", sampling=GREEDY)
    assert w.drafter.catch_up_batch([{"request_id": "p", "sequence": LONG}]) == [36]
    w.cancel("p")
    fed = len(w.drafter.requests["p"].seq.tokens)
    (err,) = w.drafter.catch_up_batch([{"request_id": "p", "sequence": LONG}])
    assert isinstance(err, RequestCancelledError) and len(w.drafter.requests["p"].seq.tokens) == fed
    with pytest.raises(RequestCancelledError):
        w.draft("p", LONG, draft_len=2)
