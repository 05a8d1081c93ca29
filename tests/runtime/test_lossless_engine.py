"""Losslessness of every method end to end (runner + drafter + verifier + loop), on tiny
random models in float32.

Sampled: the first three generated tokens of each method must follow the target's exact
joint distribution p(x1) p(x2 | x1) p(x3 | x1, x2), computed by enumerating the target's
own next-token distributions (vocab 6 -> 216 categories). N = 3000 seeded generations per
method; Pearson chi-square at alpha = 1e-4 with cells pooled to expected counts >= 5 (see
tests/conftest.py for the statistic and its exact critical value). Three tokens with
draft_len = 2 exercise every path: acceptances, rejections with residual sampling, bonus tokens,
PEARL's no-bonus post-verify and its pending row, SpecTr's survivors.

A negative control shows the statistic has power at this N: the same run with a wrong
residual (sampling from p instead of norm(max(0, p - q)) on rejection) fails.

Greedy: every method reproduces target-only greedy output token for token.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tandem.actors.local import LocalEngine, ThreadSplit
from tandem.actors.runner import ModelRunner
from tandem.speculation.sampling import SamplingParams, logits_to_probs
from tandem.speculation.sorted_policy import ExitPolicy

PROMPT = [0, 1, 2]
N = 3000
METHODS = ["sd", "sorted", "pearl", "spectr"]


@pytest.fixture(scope="module")
def engine(tiny_paths, runner_device, discipline):
    target_path, draft_path = tiny_paths
    with discipline(runner_device):  # built under the device discipline (tests/runtime/conftest.py)
        target = ModelRunner(target_path, dtype="float32", device=runner_device)
        draft = ModelRunner(draft_path, dtype="float32", exits=(2,), device=runner_device)
        with LocalEngine(target, draft, threads=1, split=ThreadSplit(target=1, draft=1)) as eng:
            yield eng


def policy_for(method: str) -> ExitPolicy | None:
    # sorted: exit 2 emits when confident, else exit 4; q is the emitting exit's distribution
    return ExitPolicy(exits=(2, 4), thresholds=(0.45,)) if method == "sorted" else None


def exact_joint(runner: ModelRunner, params: SamplingParams, n_tokens: int) -> np.ndarray:
    """[vocab ** n_tokens] exact P(first n generated tokens) under the target."""
    vocab = runner.vocab_size
    probs = np.zeros(vocab**n_tokens)
    for idx, seq in enumerate(itertools.product(range(vocab), repeat=n_tokens)):
        s = runner.new_sequence()
        logits = runner.extend(s, PROMPT + list(seq[:-1]))  # [len, vocab]
        rows = logits_to_probs(logits[len(PROMPT) - 1 :], params).cpu()  # [n_tokens, vocab]
        probs[idx] = float(np.prod([rows[i, t].item() for i, t in enumerate(seq)]))
    return probs / probs.sum()


def sample_counts(engine, method: str, params: SamplingParams, n: int, n_tokens: int) -> np.ndarray:
    vocab = engine.target.vocab_size
    counts = np.zeros(vocab**n_tokens, dtype=np.int64)
    for i in range(n):
        sp = SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=10_000 + i)
        out = engine.generate(
            PROMPT, method=method, sampling=sp, max_new_tokens=n_tokens, draft_len=2, k=2, policy=policy_for(method)
        )
        assert len(out.tokens) == n_tokens
        idx = 0
        for t in out.tokens:
            idx = idx * vocab + t
        counts[idx] += 1
    return counts


@pytest.mark.parametrize("method", ["ar"] + METHODS)  # ar: its steps run several to a call
def test_sampled_output_follows_target_distribution(engine, method, stat_tools):
    params = SamplingParams(temperature=1.0)
    exact = exact_joint(engine.target, params, 3)
    counts = sample_counts(engine, method, params, N, 3)
    fit = stat_tools.chi_square_test(counts, exact)
    assert fit.passes, f"{method}: {fit}"


def test_sampled_with_top_k_top_p_follows_processed_target(engine, stat_tools):
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    exact = exact_joint(engine.target, params, 2)
    counts = sample_counts(engine, "sd", params, 2000, 2)
    fit = stat_tools.chi_square_test(counts, exact)
    assert fit.passes, str(fit)


def test_wrong_residual_is_detected(engine, stat_tools, monkeypatch):
    """Negative control: the same statistic and N catch a lossy verifier."""
    import tandem.speculation.verify as verify_mod

    monkeypatch.setattr(verify_mod, "residual_distribution", lambda p_row, q_row: p_row)
    params = SamplingParams(temperature=1.0)
    exact = exact_joint(engine.target, params, 3)
    counts = sample_counts(engine, "sd", params, N, 3)
    fit = stat_tools.chi_square_test(counts, exact)
    assert not fit.passes, f"a wrong residual went unnoticed: {fit}"


@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_target_only(engine, method):
    for prompt in ([0, 1, 2], [5, 4], [3, 3, 3, 1, 0, 2, 4]):
        ref = engine.generate(prompt, method="ar", max_new_tokens=40).tokens
        for draft_len in (1, 3, 5):
            out = engine.generate(prompt, method=method, max_new_tokens=40, draft_len=draft_len, k=3, policy=policy_for(method))
            assert out.tokens == ref, (method, prompt, draft_len)
            # the first token comes from the prefill; every later one from a round
            assert out.stats.emitted == 39 and out.stats.rounds >= 1


def test_stats_count_what_happened(engine):
    out = engine.generate([0, 1, 2], method="sd", max_new_tokens=30, draft_len=4)
    s = out.stats
    assert s.drafted == 4 * s.rounds or s.drafted < 4 * s.rounds  # the last rounds may be shorter
    assert s.emitted == s.accepted + s.rounds  # one recovered or bonus token per round
    assert 1.0 <= s.mean_accepted_len <= 5.0
    assert len(s.acceptance_by_position()) == 4
    assert sum(out.stats.exits_used.values()) == s.drafted


def test_stop_token_ends_generation(engine):
    ref = engine.generate([0, 1, 2], method="ar", max_new_tokens=30).tokens
    stop = ref[5]
    first = ref.index(stop)
    for method in ("ar", "sd", "pearl"):
        out = engine.generate([0, 1, 2], method=method, max_new_tokens=30, stop_ids=[stop])
        assert out.tokens == ref[: first + 1]
        assert out.finish_reason == "eos"


def test_every_request_is_closed(engine):
    for method in ["ar"] + METHODS:
        engine.generate([1, 2], method=method, max_new_tokens=5, policy=policy_for(method))
    assert engine.verifier.live_requests() == []
    assert engine.drafter.live_requests() == []


def test_bad_input_names_the_field(engine):
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([1, 2], method="sd", max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([1, 2], method="sd", max_new_tokens=600)
    with pytest.raises(ValueError, match="prompt"):
        engine.generate(list(range(6)) * 100, method="sd", max_new_tokens=5)
    with pytest.raises(ValueError, match="method"):
        engine.generate([1, 2], method="magic", max_new_tokens=5)
    with pytest.raises(ValueError, match="k must"):
        engine.generate([1, 2], method="spectr", max_new_tokens=5, k=0)
    with pytest.raises(ValueError, match="draft_len"):
        engine.generate([1, 2], method="sd", max_new_tokens=5, draft_len=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="thresholds"):
        ExitPolicy(exits=(2, 4), thresholds=(1.5,))
    with pytest.raises(ValueError, match="exit"):
        engine.generate([1, 2], method="sorted", max_new_tokens=5, policy=ExitPolicy(exits=(3, 4), thresholds=(0.5,)))


def test_runner_rejects_unknown_models(tmp_path):
    with pytest.raises(ValueError, match="model"):
        ModelRunner(str(tmp_path / "nope"), dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        ModelRunner(str(tmp_path), dtype="float12")


def test_sampling_is_reproducible_with_a_seed(engine):
    sp = SamplingParams(temperature=1.0, seed=123)
    a = engine.generate([0, 1], method="pearl", sampling=sp, max_new_tokens=20, draft_len=3).tokens
    b = engine.generate([0, 1], method="pearl", sampling=sp, max_new_tokens=20, draft_len=3).tokens
    assert a == b
    assert torch.is_tensor(torch.tensor(a, device="cpu"))


def test_worker_threads_inherit_the_discipline(runner_device):
    """The runtime's worker threads (LocalSide here, MicroBatcher in the actors) run with the
    default device of the thread that made them, so the device discipline reaches the
    draft and target threads (the control: a plain thread does not inherit it)."""
    import threading
    from types import SimpleNamespace

    from tandem.actors.batching import MicroBatcher
    from tandem.actors.speculative import LocalSide

    if runner_device == "cpu":
        assert torch.get_default_device().type == "meta"  # the discipline is on in this test
    probe = SimpleNamespace(device=torch.get_default_device)
    side = LocalSide(probe, threads=1, name="probe")
    try:
        assert side.call("device").result() == torch.get_default_device()
    finally:
        side.shutdown()
    batcher = MicroBatcher({}, threads=1, name="probe")
    try:
        assert batcher.call(torch.get_default_device).result() == torch.get_default_device()
    finally:
        batcher.close()
    plain: list = []
    t = threading.Thread(target=lambda: plain.append(torch.get_default_device()))
    t.start()
    t.join()
    if runner_device == "cpu":
        assert plain == [torch.device("cpu")]


def test_default_draft_length_is_planned_then_learned(tiny_paths, runner_device, discipline):
    """A request naming no draft length gets one planned for this target and draft (measured
    cost curve, prior acceptance), then learned from this engine's own sd rounds; greedy output
    stays the target's own whatever the length. A request naming its length teaches nothing."""
    target_path, draft_path = tiny_paths
    with discipline(runner_device):
        target = ModelRunner(target_path, dtype="float32", device=runner_device)
        draft = ModelRunner(draft_path, dtype="float32", device=runner_device)
        with LocalEngine(target, draft, threads=1, split=ThreadSplit(target=1, draft=1)) as eng:
            ref = eng.generate([0, 1, 2], method="ar", max_new_tokens=30).tokens
            assert eng._length_policy is None  # nothing measured for ar
            first = eng.default_draft_len("sd")
            policy = eng.length_policy
            assert 1 <= first <= 8 and len(policy.block_costs) == 9
            assert eng.generate([0, 1, 2], method="sd", max_new_tokens=30, draft_len=2).tokens == ref
            assert policy.arms[draft.num_layers].rounds == 0  # an explicit length is not observed
            for _ in range(3):
                out = eng.generate([0, 1, 2], method="sd", max_new_tokens=30)
                assert out.tokens == ref
            arm = policy.arms[draft.num_layers]
            assert arm.rounds >= policy.min_samples and arm.draft_step_s.value > 0
            assert eng.default_draft_len("sd") == policy.best_draft_len(draft.num_layers)[0]


def test_calibrated_split_and_planned_length_share_one_cost_curve(tiny_paths, runner_device, discipline):
    from tandem.actors.local import MAX_WINDOW

    target_path, draft_path = tiny_paths
    with discipline(runner_device):
        target = ModelRunner(target_path, dtype="float32", device=runner_device)
        draft = ModelRunner(draft_path, dtype="float32", device=runner_device)
        with LocalEngine(target, draft, threads=2) as eng:  # no split given: calibrated
            ref = eng.generate([0, 1, 2], method="ar", max_new_tokens=20).tokens
            assert eng.generate([0, 1, 2], method="pearl", max_new_tokens=20).tokens == ref
            curve = eng.block_costs()
            assert len(curve) == MAX_WINDOW + 1 and 2 <= eng.split.window <= MAX_WINDOW
            eng.default_draft_len("sd")
            assert eng.block_costs() is curve and list(eng.length_policy.block_costs) == curve[:9]  # measured once


# ---------------------------------------------------------------- per-round re-planning
# The router re-plans each round of an auto request at the load of the moment (round_plan:
# draft tokens, 0 = a target-only step, and the exit to draft from). Output must not depend on it.

def _schedule(seed: int, method: str):
    """A re-plan hook drawing 0, 1 or 2 draft tokens per round and, for sd and pearl, the
    exit to draft them from (the draft's exit 2 or its full depth 4; seeded, independent of
    the tokens), and the lengths it drew."""
    import random

    from tandem.speculation.plan import RoundPlan

    rng, drawn = random.Random(seed), []

    def next_round() -> RoundPlan:
        drawn.append(rng.choice([0, 1, 2]))
        exit = rng.choice([2, 4])
        return RoundPlan(drawn[-1], ExitPolicy.single(exit) if method in ("sd", "pearl") else None)

    return next_round, drawn


def _run_replanned(engine, method: str, prompt, *, sampling=None, max_new_tokens: int, seed: int):
    from tandem.speculation.plan import SpecConfig

    hook, drawn = _schedule(seed, method)
    rounds: list[int] = []
    spec = SpecConfig(method=method, draft_len=2, policy=policy_for(method), k=2)
    out = engine.run(prompt, spec=spec, sampling=sampling, max_new_tokens=max_new_tokens,
                     round_plan=hook, on_round=lambda info: rounds.append(info["drafted"]))
    return out, rounds, drawn


@pytest.mark.parametrize("method", METHODS)
def test_greedy_with_rounds_replanned_equals_target_only(engine, method):
    target_only = drafting = 0
    for seed, prompt in enumerate(([0, 1, 2], [5, 4], [3, 3, 3, 1, 0, 2, 4])):
        ref = engine.generate(prompt, method="ar", max_new_tokens=40).tokens
        out, rounds, drawn = _run_replanned(engine, method, prompt, max_new_tokens=40, seed=seed)
        assert out.tokens == ref, (method, prompt)
        assert max(rounds) <= 2 and out.stats.emitted == 39
        target_only += rounds.count(0)
        drafting += len(rounds) - rounds.count(0)
    # the hook was obeyed: about a third of the rounds were target-only steps; a loop that
    # ignores it steps target-only at most once per request (its last token)
    assert target_only > 2 * 3 and drafting > 0, (target_only, drafting)
    assert engine.verifier.live_requests() == [] and engine.drafter.live_requests() == []


@pytest.mark.parametrize("method", ["sd", "pearl"])
def test_sampled_with_rounds_replanned_follows_target_distribution(engine, method, stat_tools):
    """Sampled output with a random draft length per round (0 included) still follows the
    target: the rounds' lengths are drawn independently of the tokens, so the joint law of
    the first three tokens must be the target's (same statistic and N as above)."""
    params = SamplingParams(temperature=1.0)
    exact = exact_joint(engine.target, params, 3)
    vocab = engine.target.vocab_size
    counts = np.zeros(vocab**3, dtype=np.int64)
    for i in range(N):
        sp = SamplingParams(temperature=1.0, seed=20_000 + i)
        out, _, _ = _run_replanned(engine, method, PROMPT, sampling=sp, max_new_tokens=3, seed=i)
        idx = 0
        for t in out.tokens:
            idx = idx * vocab + t
        counts[idx] += 1
    fit = stat_tools.chi_square_test(counts, exact)
    assert fit.passes, f"{method}: {fit}"
