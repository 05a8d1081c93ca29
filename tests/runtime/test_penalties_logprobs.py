"""Penalties, min_p and logprobs end to end (runner + drafter + verifier + loop) on tiny
random float32 models, under every method.

References are written out here independently of speculation/sampling.py: `naive_scores`
applies vLLM's penalties with Python loops, and every expected value comes from one plain
forward of the target over prompt + output (no KV-cache reuse, no speculation).

Statistics: the first three generated tokens (vocab 6 -> 216 categories) of N seeded
generations are compared to the exact penalized joint p(x1) p(x2 | x1) p(x3 | x1, x2) by
Pearson chi-square at alpha = 1e-4 with cells pooled to expected counts >= 5 (the statistic
and its exact critical value: tests/conftest.py). A correct sampler fails a given seed set
with probability <= 1e-4. With draft_len = 2 the third token is verified at row 1 of a block
whose row 0 holds the draft's x2, so the within-block penalty counts decide its law. The
loop drives the real Verifier and Drafter through `Inline` sides (calls run at once, in
this thread: the same loop code as the threaded engine, a few times faster here).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import tandem.actors.verifier as verifier_mod
from tandem.actors.drafter import Drafter
from tandem.actors.local import LocalEngine, ThreadSplit
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import SpecConfig, run_request
from tandem.actors.verifier import Verifier
from tandem.speculation.sampling import SamplingParams, logits_to_probs
from tandem.speculation.sorted_policy import ExitPolicy
from tests.runtime.conftest import Inline

PROMPT = [0, 1, 2]
METHODS = ["ar", "sd", "sorted", "pearl", "spectr"]
PENALTIES = {"repetition_penalty": 1.3, "frequency_penalty": 1.0, "presence_penalty": 1.0}
N = 600  # positive tests; the negative control's power at its N is in its docstring


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models: a second intra-op thread only adds synchronisation (and on a busy
    2-core machine, long waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runners(tiny_paths, runner_device, discipline):
    target_path, draft_path = tiny_paths
    with discipline(runner_device):  # tests/runtime/conftest.py
        return (
            ModelRunner(target_path, dtype="float32", device=runner_device),
            ModelRunner(draft_path, dtype="float32", exits=(2,), device=runner_device),
        )


@pytest.fixture(scope="module")
def engine(runners, runner_device, discipline):
    target, draft = runners
    with discipline(runner_device), LocalEngine(target, draft, threads=1, split=ThreadSplit(target=1, draft=1)) as eng:
        yield eng


def policy_for(method: str) -> ExitPolicy | None:
    return ExitPolicy(exits=(2, 4), thresholds=(0.45,)) if method == "sorted" else None


def naive_scores(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One [vocab] row penalized the way vLLM documents it, one token at a time."""
    out = logits.to(torch.float64).clone()
    for t in set(prompt) | set(output):  # repetition: prompt and output tokens
        out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
    for t in set(output):  # frequency and presence: output tokens only
        out[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    return out.to(torch.float32)


def full_forward(runner: ModelRunner, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), vocab] the target's raw logits at each output position, one forward."""
    seq = runner.new_sequence()
    logits = runner.extend(seq, prompt + output[:-1])  # [len(prompt) + len(output) - 1, vocab]
    return logits[len(prompt) - 1 :]


def reference_greedy(runner: ModelRunner, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        row = full_forward(runner, prompt, out + [0])[-1]  # the position after prompt + out
        out.append(int(naive_scores(row, params, prompt, out).argmax()))
    return out


def exact_joint(runner: ModelRunner, params: SamplingParams, n_tokens: int = 3) -> np.ndarray:
    vocab = runner.vocab_size
    probs = np.zeros(vocab**n_tokens)
    for idx, seq in enumerate(itertools.product(range(vocab), repeat=n_tokens)):
        rows = full_forward(runner, PROMPT, list(seq))  # [n_tokens, vocab]
        p = 1.0
        for i, t in enumerate(seq):
            p *= logits_to_probs(naive_scores(rows[i], params, PROMPT, list(seq[:i])), params)[t].item()
        probs[idx] = p
    return probs / probs.sum()


def sample_counts(runners, method: str, params: SamplingParams, n: int) -> np.ndarray:
    target, draft = runners
    tside, dside = Inline(Verifier(target)), Inline(Drafter(draft))
    vocab = target.vocab_size
    counts = np.zeros(vocab**3, dtype=np.int64)
    for i in range(n):
        out = run_request(
            draft=dside, target=tside, request_id=f"r{i}", prompt=PROMPT, sampling=replace(params, seed=50_000 + i),
            max_new_tokens=3, spec=SpecConfig(method=method, draft_len=2, k=2),
        )
        a, b, c = out.tokens
        counts[(a * vocab + b) * vocab + c] += 1
    assert tside.obj.live_requests() == [] and dside.obj.live_requests() == []
    return counts


# ----------------------------------------------------------------------------------------
# greedy: every method = the penalized target's argmax, token for token
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_greedy_with_penalties_equals_reference(engine, runners, method):
    params = SamplingParams(**PENALTIES)
    for prompt in ([0, 1, 2], [5, 4, 3, 3]):
        ref = reference_greedy(runners[0], prompt, params, 24)
        assert ref != reference_greedy(runners[0], prompt, SamplingParams(), 24)  # the penalties matter here
        for draft_len in (1, 4):
            out = engine.generate(prompt, method=method, sampling=params, max_new_tokens=24, draft_len=draft_len, k=3, policy=policy_for(method))
            assert out.tokens == ref, (method, prompt, draft_len)


# ----------------------------------------------------------------------------------------
# logprobs: exact under every method
# ----------------------------------------------------------------------------------------


def check_against_full_forward(runner: ModelRunner, prompt: list[int], tokens: list[int], logprobs, top_n: int) -> None:
    assert len(logprobs) == len(tokens)
    ref = torch.log_softmax(full_forward(runner, prompt, tokens), dim=-1)  # [n, vocab]
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        assert abs(lp.logprob - ref[i, t].item()) < 1e-5, (i, lp.logprob, ref[i, t].item())
        top = torch.topk(ref[i], top_n)
        assert [tid for tid, _ in lp.top] == top.indices.tolist(), i
        assert np.allclose([v for _, v in lp.top], top.values.tolist(), atol=1e-5), i


@pytest.mark.parametrize("method", METHODS)
def test_greedy_logprobs_equal_target_only(engine, runners, method):
    params = SamplingParams(logprobs=3, **PENALTIES)  # logprobs are of the raw logits, penalties or not
    ref = engine.generate(PROMPT, method="ar", sampling=params, max_new_tokens=20)
    out = engine.generate(PROMPT, method=method, sampling=params, max_new_tokens=20, draft_len=3, k=2, policy=policy_for(method))
    assert out.tokens == ref.tokens
    for a, b in zip(out.logprobs, ref.logprobs):
        assert abs(a.logprob - b.logprob) < 1e-5
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and np.allclose([v for _, v in a.top], [v for _, v in b.top], atol=1e-5)
    check_against_full_forward(runners[0], PROMPT, out.tokens, out.logprobs, 3)


@pytest.mark.parametrize("method", METHODS)
def test_sampled_logprobs_match_one_full_forward(engine, runners, method):
    params = SamplingParams(temperature=1.3, top_k=5, min_p=0.02, seed=7, logprobs=2, **PENALTIES)
    streamed = []
    out = engine.generate(
        PROMPT, method=method, sampling=params, max_new_tokens=30, draft_len=3, k=2, policy=policy_for(method), on_logprobs=streamed.extend
    )
    assert out.stats.accepted > 0 or method == "ar"  # accepted draft tokens' logprobs are checked too
    assert streamed == out.logprobs
    check_against_full_forward(runners[0], PROMPT, out.tokens, out.logprobs, 2)
    # control: the check tells raw logits from processed ones (penalized, tempered)
    rows = full_forward(runners[0], PROMPT, out.tokens)
    processed = [
        torch.log_softmax(naive_scores(rows[i], params, PROMPT, out.tokens[:i]) / params.temperature, dim=-1)[t].item()
        for i, t in enumerate(out.tokens)
    ]
    assert max(abs(a - b.logprob) for a, b in zip(processed, out.logprobs)) > 1e-2


def test_logprobs_cost_nothing_unless_asked(engine):
    out = engine.generate(PROMPT, method="sd", sampling=SamplingParams(temperature=1.0, seed=1), max_new_tokens=8)
    assert out.logprobs is None
    zero = engine.generate(PROMPT, method="sd", sampling=SamplingParams(logprobs=0), max_new_tokens=8)
    assert len(zero.logprobs) == 8 and all(lp.top == () for lp in zero.logprobs)


@pytest.mark.parametrize("method", ["sd", "pearl"])
def test_a_resumed_request_counts_what_it_emitted_as_output(runners, method):
    """A request resumed on another replica re-prefills prompt + emitted tokens; with
    prompt_len the penalties still count those as output (frequency and presence do not
    look at the prompt), so the continuation is the uninterrupted one. Control: taking the
    emitted tokens for prompt gives another continuation."""
    params = SamplingParams(**PENALTIES)
    target, draft = runners
    whole = reference_greedy(target, PROMPT, params, 24)

    def resume(prompt_len):
        return run_request(
            draft=Inline(Drafter(draft)), target=Inline(Verifier(target)), request_id="resumed", prompt=PROMPT + whole[:8],
            sampling=params, max_new_tokens=16, spec=SpecConfig(method=method, draft_len=3), prompt_len=prompt_len,
        ).tokens

    assert resume(len(PROMPT)) == whole[8:]
    assert resume(None) != whole[8:]


# ----------------------------------------------------------------------------------------
# sampled: the output follows the penalized (and min_p-truncated) target
# ----------------------------------------------------------------------------------------

SAMPLED = SamplingParams(temperature=1.0, min_p=0.05, **PENALTIES)


@pytest.mark.parametrize("method", ["sd", "spectr"])
def test_penalized_sampling_follows_penalized_target(runners, method, stat_tools):
    exact = exact_joint(runners[0], SAMPLED)
    fit = stat_tools.chi_square_test(sample_counts(runners, method, SAMPLED, N), exact)
    assert fit.passes, f"{method}: {fit}"


def test_penalties_counted_from_committed_tokens_only_are_detected(runners, stat_tools, monkeypatch):
    """Negative control: a verifier whose rows ignore the draft tokens earlier in the block
    (penalty counts from committed tokens only) fails the same test. Without min_p (so the
    failure is not just a forbidden token showing up). Power: with these seeds and N = 800
    the bug gives X^2 = 369 against a critical value of 166 (df 104), so the noncentrality
    is lambda ~ X^2 - df ~ 265; X^2 then has standard deviation sqrt(2 (df + 2 lambda)) ~ 36,
    and the line sits ~5.6 of them below its mean (two other seed sets at N = 600 gave 270
    and 425 against 158)."""
    original = verifier_mod.penalize

    def committed_only(logits, params, *, prompt, output, block=(), columns=None):
        return original(logits, params, prompt=prompt, output=output, block=[-1] * len(block), columns=columns)

    monkeypatch.setattr(verifier_mod, "penalize", committed_only)
    params = SamplingParams(temperature=1.0, **PENALTIES)
    exact = exact_joint(runners[0], params)
    fit = stat_tools.chi_square_test(sample_counts(runners, "sd", params, 800), exact)
    assert not fit.passes and math.isfinite(fit.statistic), f"the within-block penalty bug went unnoticed: {fit}"
