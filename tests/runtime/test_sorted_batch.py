"""Sorted drafting batched across requests (issue 12): a draft actor's batch of draft calls
runs in lockstep whatever each call's exit policy (one exit, or S2D's sorted exits), one
batched forward per draft position and exit depth, instead of the sorted calls one by one.

Checked on the tiny float32 draft (4 layers, exits 1, 2 and 4): a batch of mixed calls
(sorted with different exits and thresholds, single-exit at two depths, greedy and sampled,
prompts of different lengths, two rounds so caches roll back and lazy layers fill) drafts
exactly what each call drafts alone (tokens, emitting exits, q); it runs far fewer forwards
than the same calls one by one (the one-by-one count is the control); a bad or unknown call
fails in its own slot only."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.actors.drafter import Drafter
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import RequestStateLostError
from tandem.speculation.sampling import SamplingParams
from tandem.speculation.sorted_policy import ExitPolicy
from tests.runtime.conftest import count_forwards

EXITS = (1, 2)  # plus the full depth, 4

# (sampling, policy, sequence, draft_len): the thresholds sit where the tiny draft's exits'
# max probabilities fall (~0.25-0.6 over 6 tokens), so some tokens leave early and some go on
CALLS = [
    (SamplingParams(), ExitPolicy(exits=(1, 2, 4), thresholds=(0.35, 0.4)), [0, 1, 2], 4),
    (SamplingParams(), ExitPolicy(exits=(2, 4), thresholds=(0.4,)), [5, 4, 3, 1, 0, 2], 3),
    (SamplingParams(), None, [1, 1, 2], 5),  # single exit, the full depth
    (SamplingParams(), ExitPolicy.single(2), [3, 0], 2),
    (SamplingParams(temperature=1.0, seed=11), ExitPolicy(exits=(1, 4), thresholds=(0.3,)), [2, 5, 1, 0], 4),
    (SamplingParams(temperature=0.8, seed=12), ExitPolicy(exits=(1, 2, 4), thresholds=(0.3, 0.35)), [4, 4, 0], 3),
]


@pytest.fixture(scope="module")
def draft_path(tiny_paths):
    return tiny_paths[1]


def _drafter(path: str, device: str) -> Drafter:
    return Drafter(ModelRunner(path, dtype="float32", exits=EXITS, device=device))


def _open(drafter: Drafter) -> list[dict]:
    calls = []
    for i, (sampling, policy, sequence, draft_len) in enumerate(CALLS):
        drafter.open(f"r{i}", sampling=sampling)
        calls.append({"request_id": f"r{i}", "sequence": sequence, "draft_len": draft_len, "policy": policy})
    return calls


def _same(a, b) -> None:
    assert a.tokens == b.tokens and a.exits == b.exits
    assert (a.q is None) == (b.q is None)
    for qa, qb in zip(a.q or [], b.q or []):
        assert list(qa.ids) == list(qb.ids)
        np.testing.assert_allclose(qa.probs, qb.probs, rtol=1e-5, atol=1e-6)


def test_sorted_calls_batched_draft_what_they_draft_alone(draft_path, runner_device):
    alone, batched = _drafter(draft_path, runner_device), _drafter(draft_path, runner_device)
    calls = _open(alone)
    _open(batched)
    n_alone, n_batched = count_forwards(alone.runner), count_forwards(batched.runner)
    used: set[int] = set()
    for _ in range(2):  # the second round continues after one accepted token: rollback, lazy fill
        want = [alone.draft(c["request_id"], c["sequence"], draft_len=c["draft_len"], policy=c["policy"]) for c in calls]
        got = batched.draft_batch(calls)
        for w, g in zip(want, got):
            _same(w, g)
        for c, w in zip(calls, want):
            used.update(w.exits)
            c["sequence"] = list(c["sequence"]) + w.tokens[:1] + [(w.tokens[0] + 1) % 6]
    assert used == {1, 2, 4}, f"the thresholds should make every exit emit somewhere: {used}"
    # the batch ran each position's exits once for all calls: at most 3 forwards a position
    # (the longest call drafts 5, 2 rounds); alone, each call runs at least one forward per
    # token it drafts (the control: 42 here)
    assert n_batched[0] <= 2 * 5 * 3, n_batched
    assert n_alone[0] >= 2 * sum(c[3] for c in CALLS) > 2 * 5 * 3, n_alone


def test_a_failing_call_fails_alone(draft_path, runner_device):
    alone, batched = _drafter(draft_path, runner_device), _drafter(draft_path, runner_device)
    calls = _open(alone)[:3]
    _open(batched)
    bad_exit = {"request_id": "r3", "sequence": [1, 2], "draft_len": 2, "policy": ExitPolicy(exits=(3, 4), thresholds=(0.5,))}
    not_open = {"request_id": "nobody", "sequence": [1, 2], "draft_len": 2, "policy": None}
    got = batched.draft_batch([calls[0], bad_exit, calls[1], not_open, calls[2]])
    assert isinstance(got[1], ValueError) and "exit 3" in str(got[1])
    assert isinstance(got[3], RequestStateLostError)
    for c, g in zip(calls, (got[0], got[2], got[4])):
        _same(alone.draft(c["request_id"], c["sequence"], draft_len=c["draft_len"], policy=c["policy"]), g)
    with pytest.raises(ValueError, match="exit 3"):  # alone, the same failure raises
        batched.draft("r3", [1, 2], draft_len=2, policy=bad_exit["policy"])


def test_a_call_that_fills_deeper_layers_reports_them_caught_up(draft_path):
    """DraftBlock.caught_up counts the tokens a call fed before drafting down to its deepest
    exit, including those an earlier shallower exit left out of the deeper layers (the runner
    fills them lazily): the goodput policy does not price such a round as draft steps (seen
    through gRPC: a request moved from exit 8 to the full draft read 47 ms a draft token, where
    a step takes ~23, and ran off). Control: a second full-depth call lacks only its new token."""
    d = _drafter(draft_path, "cpu")
    d.open("r", sampling=SamplingParams())
    seq = [0, 1, 2, 3, 4, 5]
    shallow = d.draft("r", seq, draft_len=4, policy=ExitPolicy.single(1))
    assert shallow.caught_up == len(seq)  # a fresh request: its prompt
    seq = seq + shallow.tokens + [1]  # all four accepted, plus the target's token
    assert d.unfed("r", seq) == 2 and d.unfed("r", seq, depth=1) == 2  # the last draft token and the target's
    assert d.unfed("r", seq, depth=4) == len(seq)  # nothing went past layer 1 so far
    deep = d.draft("r", seq, draft_len=2, policy=None)
    assert deep.caught_up == len(seq)
    seq = seq + deep.tokens + [2]
    assert d.draft("r", seq, draft_len=1, policy=None).caught_up == 2
