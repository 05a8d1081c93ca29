"""speculation.verify: exact token cases, dense/sparse agreement and statistical losslessness.

The statistical tests use the chi-square machinery in conftest.py (alpha = 1e-4, exact
critical values). Every statistical test has a negative control: the same statistic, N and
seed applied to a deliberately wrong sampler (p instead of norm(max(0, p - q)) on reject),
which must fail; otherwise the positive test would prove nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.speculation import verify
from tandem.speculation.sampling import SparseDist, make_generator, sample, truncate_to_sparse
from tandem.speculation.verify import VerifyResult, residual_distribution, verify_block, verify_greedy

VOCAB = 8
# Deliberately different supports: q has mass on 1, 4 and 7 where p has none, p has mass on
# 3 and 6 where q has none (reachable only through the residual).
P_ROW = torch.tensor([0.30, 0.00, 0.22, 0.18, 0.00, 0.20, 0.10, 0.00], dtype=torch.float64)
Q_ROW = torch.tensor([0.05, 0.30, 0.35, 0.00, 0.15, 0.10, 0.00, 0.05], dtype=torch.float64)
SINGLE_N = 20_000
PAIR_N = 10_000


def one_hot(token: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), vocab).to(torch.float32)


# --- greedy -----------------------------------------------------------------------------


def test_greedy_accepts_all_and_adds_bonus() -> None:
    assert verify_greedy([4, 2, 7], [4, 2, 7, 1]) == VerifyResult(accepted_len=3, tokens=[4, 2, 7, 1])


def test_greedy_rejects_first_token() -> None:
    assert verify_greedy([4, 2, 7], [5, 2, 7, 1]) == VerifyResult(accepted_len=0, tokens=[5])


def test_greedy_rejects_in_the_middle() -> None:
    assert verify_greedy([4, 2, 7], [4, 3, 7, 1]) == VerifyResult(accepted_len=1, tokens=[4, 3])


def test_greedy_without_drafts_commits_the_target_token() -> None:
    assert verify_greedy([], [9]) == VerifyResult(accepted_len=0, tokens=[9])


def test_greedy_checks_lengths() -> None:
    with pytest.raises(ValueError, match="^target_argmax must have"):
        verify_greedy([1, 2], [1, 2])


# --- verify_block, exact cases ----------------------------------------------------------


def test_block_one_hot_accepts_all_and_takes_bonus() -> None:
    drafts = [3, 1, 6]
    q = torch.stack([one_hot(t) for t in drafts])  # [draft_len, vocab]
    p = torch.stack([one_hot(t) for t in [*drafts, 5]])  # [draft_len + 1, vocab]
    result = verify_block(draft_tokens=drafts, q=q, p=p, generator=make_generator(0))
    assert result == VerifyResult(accepted_len=3, tokens=[3, 1, 6, 5])


def test_block_one_hot_rejects_in_the_middle_and_recovers_the_target_token() -> None:
    drafts = [3, 1, 6]
    q = torch.stack([one_hot(t) for t in drafts])
    p = torch.stack([one_hot(t) for t in [3, 2, 6, 5]])  # target disagrees at position 1
    for seed in range(20):
        result = verify_block(draft_tokens=drafts, q=q, p=p, generator=make_generator(seed))
        assert result == VerifyResult(accepted_len=1, tokens=[3, 2])


def test_block_rejects_first_token_outside_target_support() -> None:
    # p(1) == 0: token 1 is never accepted; residual max(0, p - q) = [0.5, 0, 0.5] -> 0 or 2.
    p = torch.tensor([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    seen = set()
    for seed in range(50):
        result = verify_block(draft_tokens=[1], q=q, p=p, generator=make_generator(seed))
        assert result.accepted_len == 0 and len(result.tokens) == 1
        seen.add(result.tokens[0])
    assert seen == {0, 2}


def test_block_with_draft_len_zero_samples_the_bonus() -> None:
    result = verify_block(draft_tokens=[], q=torch.zeros(0, VOCAB), p=one_hot(4)[None], generator=make_generator(0))
    assert result == VerifyResult(accepted_len=0, tokens=[4])
    result = verify_block(draft_tokens=[], q=[], p=one_hot(2)[None], generator=make_generator(0))
    assert result == VerifyResult(accepted_len=0, tokens=[2])


def test_block_p_equal_q_always_accepts() -> None:
    row = torch.tensor([0.2, 0.3, 0.5])
    for seed in range(30):
        q, p = row.expand(2, -1), row.expand(3, -1)
        result = verify_block(draft_tokens=[2, 0], q=q, p=p, generator=make_generator(seed))
        assert result.accepted_len == 2 and result.tokens[:2] == [2, 0]


def test_block_is_seeded_and_leaves_inputs_alone() -> None:
    generator = make_generator(11)
    p = torch.softmax(torch.randn(4, VOCAB, generator=generator), -1)  # [draft_len + 1, vocab]
    q = torch.softmax(torch.randn(3, VOCAB, generator=generator), -1)  # [draft_len, vocab]
    drafts = sample(q, generator).tolist()
    p_before, q_before, drafts_before = p.clone(), q.clone(), list(drafts)
    first = [verify_block(draft_tokens=drafts, q=q, p=p, generator=make_generator(s)) for s in range(10)]
    again = [verify_block(draft_tokens=drafts, q=q, p=p, generator=make_generator(s)) for s in range(10)]
    assert first == again
    assert torch.equal(p, p_before) and torch.equal(q, q_before) and drafts == drafts_before
    for result in first:
        assert len(result.tokens) == result.accepted_len + 1
        assert result.tokens[: result.accepted_len] == drafts[: result.accepted_len]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"draft_tokens": [1], "q": torch.full((1, 4), 0.25), "p": torch.full((1, 4), 0.25)}, "^p must be"),
        ({"draft_tokens": [1], "q": torch.full((2, 4), 0.25), "p": torch.full((2, 4), 0.25)}, "^q must have"),
        ({"draft_tokens": [1], "q": torch.full((1, 5), 0.2), "p": torch.full((2, 4), 0.25)}, "^q must be"),
        ({"draft_tokens": [4], "q": torch.full((1, 4), 0.25), "p": torch.full((2, 4), 0.25)}, r"^draft_tokens\[0\]"),
        ({"draft_tokens": [1], "q": torch.tensor([[1.0, 0, 0, 0]]), "p": torch.full((2, 4), 0.25)}, r"^q\[0\] gives"),
    ],
)
def test_block_validates_shapes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        verify_block(**kwargs, generator=make_generator(0))


def test_residual_distribution_by_hand() -> None:
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.5])
    torch.testing.assert_close(residual_distribution(p, q), torch.tensor([0.5, 0.5, 0.0]))
    # Zero residual mass (p <= q everywhere): fall back to p.
    assert torch.equal(residual_distribution(p, p), p)


def test_sparse_and_dense_q_agree_exactly() -> None:
    generator = make_generator(5)
    for seed in range(100):
        draft_len = seed % 4
        p = torch.softmax(2 * torch.randn(draft_len + 1, VOCAB, generator=generator), -1)  # [draft_len + 1, vocab]
        full_q = torch.softmax(2 * torch.randn(draft_len, VOCAB, generator=generator), -1)  # [draft_len, vocab]
        sparse_q = [truncate_to_sparse(row, 3) for row in full_q]
        dense_q = torch.stack([d.dense(VOCAB) for d in sparse_q]) if draft_len else torch.zeros(0, VOCAB)
        drafts = [int(sample(d.dense(VOCAB), generator)) for d in sparse_q]  # the draft samples the truncated q
        from_sparse = verify_block(draft_tokens=drafts, q=sparse_q, p=p, generator=make_generator(seed))
        from_dense = verify_block(draft_tokens=drafts, q=dense_q, p=p, generator=make_generator(seed))
        assert from_sparse == from_dense


# --- statistical losslessness -----------------------------------------------------------


def first_token_counts(*, q: torch.Tensor | list[SparseDist], q_dense: torch.Tensor, seed: int) -> np.ndarray:
    """Counts of the first committed token over SINGLE_N rounds of draft_len = 1 with p0 = P_ROW."""
    generator = make_generator(seed)
    p = torch.stack([P_ROW, torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)])  # [2, vocab]
    drafts = sample(q_dense.expand(SINGLE_N, -1), generator).tolist()  # [N] iid from q
    counts = np.zeros(VOCAB, dtype=np.int64)
    for token in drafts:
        result = verify_block(draft_tokens=[token], q=q, p=p, generator=generator)
        counts[result.tokens[0]] += 1
    return counts


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_first_token_follows_p(form: str, stat_tools) -> None:
    if form == "dense":
        q_dense = Q_ROW.to(torch.float32)
        q: torch.Tensor | list[SparseDist] = q_dense[None]
    else:
        sparse = truncate_to_sparse(Q_ROW, 3)  # ids {2, 1, 4}: q on 1 and 4 where p is 0
        q_dense, q = sparse.dense(VOCAB), [sparse]
    fit = stat_tools.chi_square_test(first_token_counts(q=q, q_dense=q_dense, seed=1), P_ROW.numpy())
    assert fit.passes, str(fit)


def test_first_token_negative_control_wrong_residual_is_detected(monkeypatch, stat_tools) -> None:
    # Bug: sample from p instead of norm(max(0, p - q)) on reject. Output law:
    # w = min(p, q) + P(reject) p with P(reject) = sum max(0, q - p).
    rejection = float(torch.clamp(Q_ROW - P_ROW, min=0).sum())
    wrong = (torch.minimum(P_ROW, Q_ROW) + rejection * P_ROW).numpy()
    critical = stat_tools.chi2_critical(int((P_ROW > 0).sum()) - 1)
    lam = stat_tools.noncentrality(wrong, P_ROW.numpy(), SINGLE_N)
    assert lam > 10 * critical  # by design: ~2800 vs ~25, the bug cannot hide in the noise
    monkeypatch.setattr(verify, "residual_distribution", lambda p_row, q_row: p_row)
    q_dense = Q_ROW.to(torch.float32)
    fit = stat_tools.chi_square_test(first_token_counts(q=q_dense[None], q_dense=q_dense, seed=1), P_ROW.numpy())
    assert not fit.passes, str(fit)


def two_token_counts(*, target, draft, draft_len: int, sparse_k: int | None, seed: int) -> np.ndarray:
    """Counts of the first two committed tokens (index x * vocab + y) over PAIR_N decodes.

    A decode runs real rounds: draft `draft_len` tokens from the draft LM after the committed
    prefix, score them with the target LM, verify, and repeat until two tokens are committed
    (so recovered, accepted and bonus tokens all land in the pair).
    """
    generator = make_generator(seed)
    vocab = target.vocab
    counts = np.zeros(vocab * vocab, dtype=np.int64)
    truncated: dict[tuple[int, ...], SparseDist] = {}  # q per prefix is fixed, so truncate once
    for _ in range(PAIR_N):
        committed: list[int] = []
        while len(committed) < 2:
            drafts: list[int] = []
            q_rows: list = []
            for _ in range(draft_len):
                q_row = draft.dist(committed + drafts)  # [vocab]
                if sparse_k is not None:
                    prefix = tuple(committed + drafts)
                    if prefix not in truncated:
                        truncated[prefix] = truncate_to_sparse(q_row, sparse_k)  # the draft ships and samples this
                    q_row = truncated[prefix]
                    q_rows.append(q_row)
                    drafts.append(int(sample(q_row.dense(vocab), generator)))
                else:
                    q_rows.append(q_row)
                    drafts.append(int(sample(q_row, generator)))
            p = torch.stack([target.dist(committed + drafts[:j]) for j in range(draft_len + 1)])  # [draft_len + 1, vocab]
            q = q_rows if sparse_k is not None else torch.stack(q_rows)
            committed += verify_block(draft_tokens=drafts, q=q, p=p, generator=generator).tokens
        counts[committed[0] * vocab + committed[1]] += 1
    return counts


def toy_pair(stat_tools):
    """Target and draft LMs over 6 tokens with two zeros each per prefix, differently placed."""
    target = stat_tools.ToyLM(vocab=6, seed=101, n_zero=2)
    draft = stat_tools.ToyLM(vocab=6, seed=203, n_zero=2, base=target, mix=0.5)
    p0, q0 = target.dist(()), draft.dist(())
    assert ((q0 > 0) & (p0 == 0)).any() and ((p0 > 0) & (q0 == 0)).any()  # supports differ
    return target, draft


@pytest.mark.parametrize(("draft_len", "sparse_k"), [(1, None), (2, None), (3, None), (2, 3)])
def test_two_token_sequences_follow_the_target(draft_len: int, sparse_k: int | None, stat_tools) -> None:
    target, draft = toy_pair(stat_tools)
    counts = two_token_counts(target=target, draft=draft, draft_len=draft_len, sparse_k=sparse_k, seed=3)
    fit = stat_tools.chi_square_test(counts, stat_tools.pair_distribution(target))
    assert fit.passes, str(fit)


def test_two_token_negative_control_wrong_residual_is_detected(monkeypatch, stat_tools) -> None:
    target, draft = toy_pair(stat_tools)
    monkeypatch.setattr(verify, "residual_distribution", lambda p_row, q_row: p_row)
    counts = two_token_counts(target=target, draft=draft, draft_len=2, sparse_k=None, seed=3)
    fit = stat_tools.chi_square_test(counts, stat_tools.pair_distribution(target))
    assert not fit.passes, str(fit)
