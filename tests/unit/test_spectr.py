"""speculation.spectr (SpecTr K-SEQ): rho, exact cases, equivalence with k = 1 and
statistical losslessness with negative controls (see conftest.py for the statistic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.speculation import spectr
from tandem.speculation.sampling import make_generator, sample
from tandem.speculation.spectr import (
    KSeqResult,
    beta,
    kseq_residual,
    kseq_rho,
    kseq_select,
    verify_kseq,
    verify_kseq_greedy,
)
from tandem.speculation.verify import residual_distribution, verify_block

VOCAB = 8
# Different supports on purpose (q on 1, 4, 7 where p is 0; p on 3, 6 where q is 0).
P_ROW = torch.tensor([0.30, 0.00, 0.22, 0.18, 0.00, 0.20, 0.10, 0.00], dtype=torch.float64)
Q_ROW = torch.tensor([0.05, 0.30, 0.35, 0.00, 0.15, 0.10, 0.00, 0.05], dtype=torch.float64)
SELECT_N = 10_000
PAIR_N = 6_000


def one_hot(token: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), vocab).to(torch.float32)


def random_pair(seed: int, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Random p, q with a few zeros each (so supports differ)."""
    rng = np.random.default_rng(seed)
    rows = rng.dirichlet(np.full(vocab, 0.7), size=2)  # [2, vocab]
    for row in rows:
        row[rng.choice(vocab, size=2, replace=False)] = 0.0
    rows /= rows.sum(axis=1, keepdims=True)
    return torch.from_numpy(rows[0]), torch.from_numpy(rows[1])


def condition(p: torch.Tensor, q: torch.Tensor, k: int, rho: float) -> bool:
    b = beta(p, q, rho)
    return 1 - (1 - b) ** k <= rho * b


# --- beta and rho -----------------------------------------------------------------------


def test_beta_by_hand() -> None:
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.2, 0.3, 0.5])
    # min(0.2, 0.25) + min(0.3, 0.25) + min(0.5, 0) = 0.45
    assert beta(p, q, 2.0) == pytest.approx(0.45)
    assert beta(p, q, 1.0) == pytest.approx(0.5)  # 1 - TV(p, q)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("seed", range(6))
def test_rho_is_the_smallest_rho_satisfying_the_condition(k: int, seed: int) -> None:
    p, q = random_pair(seed)
    rho = kseq_rho(p, q, k)
    assert 1.0 <= rho <= k
    assert condition(p, q, k, rho)
    if rho > 1.0:
        assert not condition(p, q, k, rho - 1e-6)  # bisection width is (k - 1) / 2**40


def test_rho_for_p_equal_q_and_k_one() -> None:
    p, q = random_pair(0)
    assert kseq_rho(p, p, 4) == 1.0
    assert kseq_rho(p, q, 1) == 1.0
    with pytest.raises(ValueError, match="^k must be >= 1"):
        kseq_rho(p, q, 0)


def test_rho_for_the_test_rows_is_above_one() -> None:
    # The statistical tests below rely on rho > 1 (otherwise ignoring rho is no bug).
    assert kseq_rho(P_ROW, Q_ROW, 2) > 1.5 and kseq_rho(P_ROW, Q_ROW, 4) > 2.5


@pytest.mark.parametrize("k", [2, 4])
def test_residual_at_the_root_is_max_p_minus_rho_q(k: int) -> None:
    rho = kseq_rho(P_ROW, Q_ROW, k)
    expected = torch.clamp(P_ROW - rho * Q_ROW, min=0)
    torch.testing.assert_close(kseq_residual(P_ROW, Q_ROW, rho=rho, k=k), expected / expected.sum(), atol=1e-7, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_select_output_law_is_exactly_p(k: int) -> None:
    # The closed form from kseq_select's docstring: c m + (1 - beta)^k r == p.
    rho = kseq_rho(P_ROW, Q_ROW, k)
    accept_mass = torch.minimum(Q_ROW, P_ROW / rho)
    b = float(accept_mass.sum())
    law = (1 - (1 - b) ** k) / b * accept_mass + (1 - b) ** k * kseq_residual(P_ROW, Q_ROW, rho=rho, k=k)
    torch.testing.assert_close(law, P_ROW, atol=1e-12, rtol=0)


# --- kseq_select, exact cases -----------------------------------------------------------


def test_select_disjoint_supports_always_uses_the_residual() -> None:
    p = torch.tensor([0.0, 0.0, 1.0, 0.0])
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    for seed in range(10):
        assert kseq_select(candidates=[0, 1, 0], p=p, q=q, generator=make_generator(seed)) == (None, 2)


def test_select_first_acceptable_candidate_wins() -> None:
    p = torch.tensor([0.0, 1.0, 0.0])
    q = torch.tensor([0.5, 0.5, 0.0])
    # candidate 0 (token 0) has p = 0: rejected; candidate 1 (token 1): p/(rho q) = 1/(1.5 * 0.5) >= 1.
    assert kseq_select(candidates=[0, 1, 1], p=p, q=q, generator=make_generator(0)) == (1, 1)


def test_select_with_no_candidates_samples_p() -> None:
    p, q = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])
    assert kseq_select(candidates=[], p=p, q=q, generator=make_generator(0)) == (None, 1)


def test_select_rejects_candidates_outside_q() -> None:
    with pytest.raises(ValueError, match="^q gives candidate"):
        p, q = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0])
        kseq_select(candidates=[2], p=p, q=q, generator=make_generator(0))


def test_select_with_one_candidate_is_standard_speculative_sampling() -> None:
    generator = make_generator(9)
    for seed in range(200):
        p, q = random_pair(seed)
        token = int(sample(q, generator))
        block = verify_block(draft_tokens=[token], q=q[None], p=torch.stack([p, p]), generator=make_generator(seed))
        index, chosen = kseq_select(candidates=[token], p=p, q=q, generator=make_generator(seed))
        assert chosen == block.tokens[0]
        assert (index == 0) == (block.accepted_len == 1)


# --- verify_kseq, exact cases -----------------------------------------------------------


def test_kseq_follows_the_surviving_draft_and_takes_its_bonus() -> None:
    drafts = [[1, 2], [1, 3]]
    half = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    q = [torch.stack([one_hot(1), half]) for _ in drafts]  # position 1: 2 or 3 with prob 1/2
    p = [
        torch.stack([one_hot(1), one_hot(3), one_hot(0)]),  # along draft 0 (its row 2 is unused)
        torch.stack([one_hot(1), one_hot(3), one_hot(5)]),  # along draft 1
    ]
    # Position 0: both drafts say 1 and p == q there, accepted. Position 1: rho = 1.5,
    # token 2 has p = 0 (rejected), token 3 has p/(rho q) = 1/0.75 >= 1 (accepted); only
    # draft 1 survives, so the bonus comes from its row 2.
    for seed in range(10):
        result = verify_kseq(drafts=drafts, q=q, p=p, generator=make_generator(seed))
        assert result == KSeqResult(accepted_len=2, tokens=[1, 3, 5], source_draft=1)


def test_kseq_stops_at_a_residual_token() -> None:
    drafts = [[1, 2], [4, 2]]
    q_row0 = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    q = [torch.stack([q_row0, one_hot(2)]) for _ in drafts]
    p = [torch.stack([one_hot(6), one_hot(2), one_hot(2)]) for _ in drafts]
    result = verify_kseq(drafts=drafts, q=q, p=p, generator=make_generator(0))
    assert result == KSeqResult(accepted_len=0, tokens=[6], source_draft=None)


def test_kseq_with_draft_len_zero_samples_the_bonus() -> None:
    q, p = [torch.zeros(0, 3)] * 2, [torch.tensor([[0.0, 0.0, 1.0]])] * 2
    result = verify_kseq(drafts=[[], []], q=q, p=p, generator=make_generator(0))
    assert result == KSeqResult(accepted_len=0, tokens=[2], source_draft=None)


def test_kseq_with_one_draft_matches_verify_block_exactly() -> None:
    generator = make_generator(4)
    for seed in range(100):
        draft_len = seed % 4
        p = torch.softmax(2 * torch.randn(draft_len + 1, VOCAB, generator=generator), -1)  # [draft_len + 1, vocab]
        q = torch.softmax(2 * torch.randn(draft_len, VOCAB, generator=generator), -1)  # [draft_len, vocab]
        drafts = sample(q, generator).tolist() if draft_len else []
        block = verify_block(draft_tokens=drafts, q=q, p=p, generator=make_generator(seed))
        kseq = verify_kseq(drafts=[drafts], q=[q], p=[p], generator=make_generator(seed))
        assert (kseq.accepted_len, kseq.tokens) == (block.accepted_len, block.tokens)
        assert kseq.source_draft == (0 if block.accepted_len else None)


def test_kseq_validates_shapes() -> None:
    q, p = torch.full((2, 4), 0.25), torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="^drafts must share one length"):
        verify_kseq(drafts=[[1, 2], [1]], q=[q, q], p=[p, p], generator=make_generator(0))
    with pytest.raises(ValueError, match="^drafts must hold"):
        verify_kseq(drafts=[], q=[], p=[], generator=make_generator(0))
    with pytest.raises(ValueError, match=r"^p\[1\] must be"):
        verify_kseq(drafts=[[1, 2], [1, 3]], q=[q, q], p=[p, p[:2]], generator=make_generator(0))
    with pytest.raises(ValueError, match="^q and p must have one entry per draft"):
        verify_kseq(drafts=[[1, 2], [1, 3]], q=[q], p=[p, p], generator=make_generator(0))


# --- verify_kseq_greedy -----------------------------------------------------------------


def test_kseq_greedy_longest_matching_prefix_wins() -> None:
    drafts = [[5, 1, 2], [7, 1, 2], [7, 3, 9]]
    target_argmax = [[7, 0, 0, 0], [7, 1, 4, 8], [7, 3, 9, 6]]
    assert verify_kseq_greedy(drafts=drafts, target_argmax=target_argmax) == KSeqResult(
        accepted_len=3, tokens=[7, 3, 9, 6], source_draft=2
    )


def test_kseq_greedy_ties_go_to_the_lowest_draft() -> None:
    drafts = [[7, 1, 2], [7, 3, 2]]
    target_argmax = [[7, 4, 0, 0], [7, 5, 0, 0]]
    assert verify_kseq_greedy(drafts=drafts, target_argmax=target_argmax) == KSeqResult(
        accepted_len=1, tokens=[7, 4], source_draft=0
    )


def test_kseq_greedy_no_match_commits_the_target_token() -> None:
    result = verify_kseq_greedy(drafts=[[1, 2], [3, 4]], target_argmax=[[9, 9, 9], [9, 9, 9]])
    assert result == KSeqResult(accepted_len=0, tokens=[9], source_draft=None)


def test_kseq_greedy_checks_lengths() -> None:
    with pytest.raises(ValueError, match=r"^target_argmax\[1\] must have"):
        verify_kseq_greedy(drafts=[[1], [2]], target_argmax=[[1, 2], [2]])


# --- statistical losslessness -----------------------------------------------------------


def select_counts(k: int, seed: int) -> np.ndarray:
    """Counts of kseq_select's token over SELECT_N positions with k iid candidates from Q_ROW."""
    generator = make_generator(seed)
    candidates = sample(Q_ROW.expand(SELECT_N, k, VOCAB), generator).tolist()  # [N, k] iid from q
    counts = np.zeros(VOCAB, dtype=np.int64)
    for row in candidates:
        counts[kseq_select(candidates=row, p=P_ROW, q=Q_ROW, generator=generator)[1]] += 1
    return counts


@pytest.mark.parametrize("k", [1, 2, 4])
def test_select_follows_p(k: int, stat_tools) -> None:
    fit = stat_tools.chi_square_test(select_counts(k, seed=2), P_ROW.numpy())
    assert fit.passes, str(fit)


def ignore_rho(p: torch.Tensor, q: torch.Tensor, *, rho: float, k: int) -> torch.Tensor:
    """The bug for the negative controls: residual norm(max(0, p - q)), as if rho were 1."""
    return residual_distribution(p.to(torch.float64), q.to(torch.float64))


def test_select_negative_control_residual_ignoring_rho_is_detected(monkeypatch, stat_tools) -> None:
    k = 4
    rho = kseq_rho(P_ROW, Q_ROW, k)
    accept_mass = torch.minimum(Q_ROW, P_ROW / rho)
    b = float(accept_mass.sum())
    wrong = (1 - (1 - b) ** k) / b * accept_mass + (1 - b) ** k * residual_distribution(P_ROW, Q_ROW)
    critical = stat_tools.chi2_critical(int((P_ROW > 0).sum()) - 1)
    lam = stat_tools.noncentrality(wrong.numpy(), P_ROW.numpy(), SELECT_N)
    assert lam > 10 * critical  # by design: ~530 vs ~24
    monkeypatch.setattr(spectr, "kseq_residual", ignore_rho)
    fit = stat_tools.chi_square_test(select_counts(k, seed=2), P_ROW.numpy())
    assert not fit.passes, str(fit)


def kseq_pair_counts(*, target, draft, k: int, draft_len: int, seed: int) -> np.ndarray:
    """Counts of the first two committed tokens (x * vocab + y) over PAIR_N decodes with K-SEQ
    rounds: k independent draft sequences of length draft_len per round, repeated until two
    tokens are committed."""
    generator = make_generator(seed)
    vocab = target.vocab
    counts = np.zeros(vocab * vocab, dtype=np.int64)
    for _ in range(PAIR_N):
        committed: list[int] = []
        while len(committed) < 2:
            drafts: list[list[int]] = []
            for _ in range(k):
                tokens: list[int] = []
                for _ in range(draft_len):
                    tokens.append(int(sample(draft.dist(committed + tokens), generator)))  # own path, independent
                drafts.append(tokens)
            # k x [draft_len, vocab] and k x [draft_len + 1, vocab], each along its own draft
            q = [torch.stack([draft.dist(committed + d[:j]) for j in range(draft_len)]) for d in drafts]
            p = [torch.stack([target.dist(committed + d[:j]) for j in range(draft_len + 1)]) for d in drafts]
            committed += verify_kseq(drafts=drafts, q=q, p=p, generator=generator).tokens
        counts[committed[0] * vocab + committed[1]] += 1
    return counts


def toy_pair(stat_tools):
    """Target and draft LMs over 5 tokens; the draft is a poor one (mix 0.3) so that rho > 1
    and the residual matter, with supports that differ at the first position."""
    target = stat_tools.ToyLM(vocab=5, seed=301, n_zero=1)
    draft = stat_tools.ToyLM(vocab=5, seed=400, n_zero=1, base=target, mix=0.3)
    p0, q0 = target.dist(()), draft.dist(())
    assert ((q0 > 0) & (p0 == 0)).any() and ((p0 > 0) & (q0 == 0)).any()
    return target, draft



@pytest.mark.parametrize("k", [2, 4])
def test_kseq_two_token_sequences_follow_the_target(k: int, stat_tools) -> None:
    target, draft = toy_pair(stat_tools)
    counts = kseq_pair_counts(target=target, draft=draft, k=k, draft_len=2, seed=5)
    fit = stat_tools.chi_square_test(counts, stat_tools.pair_distribution(target))
    assert fit.passes, str(fit)


def test_kseq_two_token_negative_control_residual_ignoring_rho_is_detected(monkeypatch, stat_tools) -> None:
    target, draft = toy_pair(stat_tools)
    monkeypatch.setattr(spectr, "kseq_residual", ignore_rho)
    counts = kseq_pair_counts(target=target, draft=draft, k=4, draft_len=2, seed=5)
    fit = stat_tools.chi_square_test(counts, stat_tools.pair_distribution(target))
    assert not fit.passes, str(fit)
