"""SpecTr batched across requests (issue 12): a draft actor drafts the branches of several
requests in one forward per draft position, and a target verifies them in the same batched
forward as other requests' blocks (Verifier.step), instead of one request per call.

Checked on the tiny float32 models: branches drafted in a batch equal those drafted alone
(greedy and sampled, different k and draft_len) in fewer forwards (the one-by-one count is
the control); a step verifying SpecTr branches beside an sd block and an autoregressive step
commits what each verification commits alone, and the winners' caches carry on (the next
steps agree too); a bad call fails in its own slot."""

from __future__ import annotations

import numpy as np

from tandem.actors.drafter import DraftBlock, Drafter
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import RequestStateLostError
from tandem.actors.verifier import Verifier
from tandem.speculation.sampling import SamplingParams
from tests.runtime.conftest import count_forwards

GREEDY = SamplingParams()
# (sampling, sequence, draft_len, k)
CALLS = [
    (GREEDY, [0, 1, 2], 3, 3),
    (SamplingParams(temperature=1.0, seed=5), [5, 4, 3, 1], 2, 2),
    (GREEDY, [1, 1, 2, 0, 4], 4, 2),
    (SamplingParams(temperature=0.7, seed=6), [2, 3], 3, 4),
]


def _drafter(path: str, device: str) -> Drafter:
    return Drafter(ModelRunner(path, dtype="float32", device=device))


def _same_branches(a, b) -> None:
    assert a.branches == b.branches
    assert (a.q is None) == (b.q is None)
    for qa, qb in zip(a.q or [], b.q or []):
        for x, y in zip(qa, qb):
            assert list(x.ids) == list(y.ids)
            # the head runs once over all the calls' rows in a batch and over one call's alone,
            # so its float32 matmul is blocked differently: up to ~1.3e-5 apart (test_runner's TOL_BATCH)
            np.testing.assert_allclose(x.probs, y.probs, rtol=1e-4, atol=1e-6)


def _open_drafts(drafter: Drafter) -> list[dict]:
    calls = []
    for i, (sampling, sequence, draft_len, k) in enumerate(CALLS):
        drafter.open(f"r{i}", sampling=sampling)
        calls.append({"request_id": f"r{i}", "sequence": sequence, "draft_len": draft_len, "k": k})
    return calls


def test_branches_batched_draft_what_they_draft_alone(tiny_paths, runner_device):
    alone, batched = _drafter(tiny_paths[1], runner_device), _drafter(tiny_paths[1], runner_device)
    calls = _open_drafts(alone)
    _open_drafts(batched)
    n_alone, n_batched = count_forwards(alone.runner), count_forwards(batched.runner)
    for _ in range(2):  # the second round continues from a branch: rollback
        want = [alone.draft_branches(c["request_id"], c["sequence"], draft_len=c["draft_len"], k=c["k"]) for c in calls]
        got = batched.branches_batch(calls)
        for w, g in zip(want, got):
            _same_branches(w, g)
        for c, w in zip(calls, want):
            c["sequence"] = list(c["sequence"]) + w.branches[-1][:2]
    # batched: one forward for the new tokens, then one per further position of the longest
    # call (4); alone: that for every call (3 + 2 + 4 + 3 = 12 a round)
    assert n_batched[0] <= 2 * 4, n_batched
    assert n_alone[0] >= 2 * sum(c[2] for c in CALLS) > 2 * 4, n_alone
    # a failing call fails alone
    got = batched.branches_batch([calls[0], {**calls[1], "k": 0}, {**calls[2], "request_id": "nobody"}])
    assert isinstance(got[1], ValueError) and "k must be >= 1" in str(got[1])
    assert isinstance(got[2], RequestStateLostError)
    _same_branches(alone.draft_branches(calls[0]["request_id"], calls[0]["sequence"], draft_len=calls[0]["draft_len"], k=calls[0]["k"]), got[0])


def test_branches_verified_in_one_step_beside_blocks(tiny_paths, runner_device):
    target_path, draft_path = tiny_paths
    drafter = _drafter(draft_path, runner_device)
    calls = _open_drafts(drafter)
    branches = drafter.branches_batch(calls)
    block = DraftBlock(tokens=[1, 2], q=None, exits=[4, 4])

    def verifier():
        v = Verifier(ModelRunner(target_path, dtype="float32", device=runner_device))
        for i, (sampling, sequence, _, _) in enumerate(CALLS):
            v.open(f"r{i}", sequence, sampling=sampling)
        v.open("sd", [3, 1, 4], sampling=GREEDY)
        v.open("ar", [2, 2], sampling=GREEDY)
        return v

    alone, mixed = verifier(), verifier()
    ids = [f"r{i}" for i in range(len(CALLS))] + ["sd", "ar"]
    blocks = list(branches) + [block, None]
    rows = count_forwards(mixed.runner)
    won = set()
    for _ in range(3):  # the same drafts again after each commit: the winners' caches carry on
        want = [alone.verify_branches(r, b) if b is not None and hasattr(b, "branches") else alone.verify(r, b)
                for r, b in zip(ids, blocks)]
        got, _ = mixed.step(ids, blocks)
        for w, g in zip(want, got):
            assert (g.tokens, g.accepted_len, g.branch, g.drafted) == (w.tokens, w.accepted_len, w.branch, w.drafted)
        won.update(w.branch for w in want[: len(CALLS)])
        # every branch, the block and the step ran in that one forward
        assert got[0].step_rows >= sum(len(br) for b in branches for br in b.branches) + 2
    assert rows[0] == 3
    assert {r: alone.committed(r) for r in ids} == {r: mixed.committed(r) for r in ids}
    for r in ids:  # each request's cache holds its own committed tokens (the winner's, not branch 0's)
        seq, committed = mixed.requests[r].seq, mixed.committed(r)
        assert seq.length == len(seq.tokens) and list(seq.tokens) == committed[: seq.length], r
    assert won - {None, 0}, f"a branch other than the first should win somewhere (its cache is kept): {won}"


def test_a_spectr_round_holds_as_many_caches_as_admission_reserves(tiny_paths, runner_device):
    """What admission reserves per request (plan.kv_copies: k caches for SpecTr, 1 otherwise)
    covers what a round allocates: on the draft and on the target, a SpecTr round forks the
    request's cache once for every branch but the first, at the cache's full capacity; an sd
    round forks nothing (the control)."""
    from tandem.speculation.plan import SpecConfig, kv_copies

    target_path, draft_path = tiny_paths
    drafter = _drafter(draft_path, runner_device)
    verifier = Verifier(ModelRunner(target_path, dtype="float32", device=runner_device))
    capacity, k = 96, 3
    drafter.open("s", sampling=GREEDY, capacity=capacity)
    verifier.open("s", [0, 1, 2], sampling=GREEDY, capacity=capacity)
    verifier.open("d", [0, 1, 2], sampling=GREEDY, capacity=capacity)
    allocated: list[int] = []  # capacity of every copy of a cache made during the round
    for runner in (drafter.runner, verifier.runner):
        real = runner.fork

        def spy(seq, real=real):
            child = real(seq)
            allocated.append(child.capacity)
            return child

        runner.fork = spy
    branches = drafter.branches_batch([{"request_id": "s", "sequence": [0, 1, 2], "draft_len": 3, "k": k}])[0]
    drafted = list(allocated)
    verifier.step(["s"], [branches])
    verified = allocated[len(drafted):]
    for caches in (drafted, verified):  # besides the request's own cache
        assert caches == [capacity] * (k - 1), caches
    assert 1 + len(verified) == kv_copies(SpecConfig(method="spectr", draft_len=3, k=k)) == k
    allocated.clear()
    verifier.step(["d"], [DraftBlock(tokens=[1, 2], q=None, exits=[4, 4])])
    assert allocated == [] and kv_copies(SpecConfig(method="sd", draft_len=2)) == 1
