"""Several target-only steps in one call (Verifier.steps, TargetWorker.steps; the loops send
one for every round planned without drafts, speculation/plan.py TARGET_STEPS_PER_CALL).

Checked on the tiny float32 target: n steps in one call commit exactly what n verify(None)
calls commit (tokens, logprobs, sampled tokens from the request's own generator); a run stops
after a stop id and at a cancel, with one call of n steps as the control that does not; the
loop makes one call per TARGET_STEPS_PER_CALL tokens and still reports one round per token
(stats, on_round), with the tokens of one verify per step."""

from __future__ import annotations

import pytest

from tandem.actors.speculative import RequestCancelledError, run_request
from tandem.actors.tracing import Traced
from tandem.actors.verifier import Verifier
from tandem.actors.workers import ModelLoad, TargetWorker
from tandem.speculation.plan import TARGET_STEPS_PER_CALL, RoundPlan, SpecConfig
from tandem.speculation.sampling import SamplingParams
from tests.runtime.conftest import Inline

PROMPT = [0, 1, 2, 3]
SAMPLED = SamplingParams(temperature=1.0, seed=7, logprobs=2)


@pytest.fixture(scope="module")
def runner(tiny_paths):
    return ModelLoad(path=tiny_paths[0], dtype="float32").build()


def _opened(runner, sampling: SamplingParams, key: str = "r") -> Verifier:
    v = Verifier(runner)
    v.open(key, PROMPT, sampling=sampling)
    return v


@pytest.mark.parametrize("sampling", [SamplingParams(logprobs=1), SAMPLED], ids=["greedy", "sampled"])
def test_steps_commit_what_one_verify_per_step_commits(runner, sampling):
    one = _opened(runner, sampling)
    want = [one.verify("r", None) for _ in range(7)]
    many = _opened(runner, sampling)
    got = many.steps("r", 4) + many.steps("r", 3)
    assert [o.tokens for o in got] == [o.tokens for o in want]
    assert [o.logprobs for o in got] == [o.logprobs for o in want]
    assert many.committed("r") == one.committed("r") == PROMPT + [t for o in want for t in o.tokens]
    assert all(o.drafted == 0 and o.accepted_len == 0 and len(o.tokens) == 1 for o in got)


def test_steps_stop_after_a_stop_id(runner):
    ref = [o.tokens[0] for o in _opened(runner, SamplingParams()).steps("r", 12)]
    assert len(ref) == 12  # the control: no stop id, all 12 steps
    stop = ref[3]
    first = ref.index(stop)
    v = _opened(runner, SamplingParams())
    got = v.steps("r", 12, stop_ids=[stop])
    assert [o.tokens[0] for o in got] == ref[: first + 1]
    assert v.committed("r") == PROMPT + ref[: first + 1]  # no step ran past the stop id


def test_worker_steps_stop_at_a_cancel(tiny_paths):
    """A cancel that arrives during the first step drops the rest: the call answers with the
    step it ran, and the next call is refused. The control, a request never cancelled, runs
    all its steps. Traced, each step has its own span record."""
    worker = TargetWorker(ModelLoad(path=tiny_paths[0], dtype="float32"), threads=1)
    try:
        for key in ("kept", "cancelled"):
            worker.open(key, PROMPT, sampling=SamplingParams())
        ran = worker.steps("kept", 4, trace={})
        assert isinstance(ran, Traced) and len(ran.value) == 4 and len(ran.spans) == 4

        submit = worker.batcher.submit
        submitted = []

        def cancel_after_the_first(*args, **kwargs):
            fut = submit(*args, **kwargs)
            submitted.append(fut)
            if len(submitted) == 1:
                fut.result()  # the first step has run
                worker.cancel("cancelled")
            return fut

        worker.batcher.submit = cancel_after_the_first
        got = worker.steps("cancelled", 4)
        assert len(got) == 1 and len(submitted) == 2  # the second step was dropped, no third queued
        with pytest.raises(RequestCancelledError):
            worker.steps("cancelled", 4)
        worker.batcher.submit = submit
        assert worker.close("cancelled") and worker.close("kept")
    finally:
        worker.batcher.close()


class _Counting(Inline):
    """An Inline side that counts its calls by method."""

    def __init__(self, obj):
        super().__init__(obj)
        self.calls: dict[str, int] = {}

    def call(self, method: str, /, *args, **kwargs):
        self.calls[method] = self.calls.get(method, 0) + 1
        return super().call(method, *args, **kwargs)


@pytest.mark.parametrize("method", ["ar", "sd", "pearl", "spectr"])
def test_the_loop_sends_one_call_per_steps_and_reports_each_step(runner, method):
    """Target-only rounds (ar, and drafting loops re-planned to 0 drafts) go out as one call
    of up to TARGET_STEPS_PER_CALL steps; each step is still a round of its own in the stats
    and on_round, in order in time, and the tokens are those of one verify per step."""
    n_new = 11
    ref = _opened(runner, SamplingParams())
    want = [t for _ in range(n_new) for t in ref.verify("r", None).tokens]
    target = _Counting(Verifier(runner))
    rounds = []
    out = run_request(
        draft=None, target=target, request_id="x", prompt=PROMPT, sampling=SamplingParams(), max_new_tokens=n_new,
        spec=SpecConfig(method=method, draft_len=2), on_round=rounds.append, round_plan=lambda: RoundPlan(0),
    )
    assert out.tokens == want and out.finish_reason == "length"
    steps = n_new - 1  # the first token comes with the prefill's verify
    assert target.calls["steps"] == -(-steps // TARGET_STEPS_PER_CALL)
    assert target.calls["verify"] == 1
    assert out.stats.rounds == steps == len(rounds) == len(out.per_round_s)
    assert [r["emitted"] for r in rounds] == [1] * steps and all(r["drafted"] == 0 for r in rounds)
    # in order in time (5 ms: the two clocks a round's span is read from are read apart)
    assert all(a["end_ns"] <= b["start_ns"] + 5_000_000 for a, b in zip(rounds, rounds[1:]))
    assert all(s > 0 for s in out.per_round_s)
    assert target.obj.live_requests() == []
