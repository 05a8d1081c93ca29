"""SpecTr K-SEQ: lossless verification with k independent draft sequences.

Glossary
--------
draft
    The small model; k draft sequences are sampled from it independently, each of length
    draft_len. ``q`` is its distribution at a position.
target
    The large model whose distribution ``p`` the output must follow exactly.
round
    One :func:`verify_kseq` call: k drafts in, ``accepted_len + 1`` committed tokens out.
accepted
    At a position, candidate x is accepted with probability ``min(1, p(x) / (rho q(x)))``;
    the first accepted candidate (in draft order) is committed.
recovered / residual
    If no candidate is accepted, a token is sampled from the residual
    ``r ∝ max(0, p - c * min(q, p / rho))`` (see :func:`kseq_select`) and the round stops.
bonus token
    If a draft survives all draft_len positions, one more token is sampled from the target's
    distribution after it.
survivors
    The drafts whose tokens equal everything committed so far in this round.

Paper: Sun et al. 2023, "SpecTr: Fast Speculative Decoding via Optimal Transport",
arXiv 2310.15141 (K-SEQ, Algorithm 3 and its sequence extension). With k == 1, rho == 1 and
this reduces to standard speculative sampling (Leviathan et al. 2023, arXiv 2211.17192;
Chen et al. 2023, arXiv 2302.01318).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "KSeqResult",
    "beta",
    "kseq_residual",
    "kseq_rho",
    "kseq_select",
    "verify_kseq",
    "verify_kseq_greedy",
]


def _on_q_support(p: torch.Tensor, q: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 numpy (p, q) restricted to q > 0: min(q, p/rho) is 0 elsewhere, so beta only
    needs these entries (a few dozen with a sparse q instead of the whole vocab)."""
    q64 = q.detach().to(torch.float64).cpu().numpy()  # [vocab]
    p64 = p.detach().to(torch.float64).cpu().numpy()  # [vocab]
    support = q64 > 0
    return p64[support], q64[support]  # [n], [n]


def _beta_np(p_s: np.ndarray, q_s: np.ndarray, rho: float) -> float:
    """sum_x min(q(x), p(x)/rho) on numpy arrays."""
    return float(np.minimum(q_s, p_s / rho).sum())


def _condition_holds(p_s: np.ndarray, q_s: np.ndarray, k: int, rho: float) -> bool:
    """1 - (1 - beta)^k <= rho * beta: acceptance never over-covers p (see kseq_select)."""
    b = _beta_np(p_s, q_s, rho)
    return 1.0 - (1.0 - b) ** k <= rho * b


def beta(p: torch.Tensor, q: torch.Tensor, rho: float) -> float:
    """sum_x min(q(x), p(x)/rho): the probability one candidate x ~ q is accepted at rho."""
    return _beta_np(*_on_q_support(p, q), rho)


def kseq_rho(p: torch.Tensor, q: torch.Tensor, k: int, *, iters: int = 40) -> float:
    """Smallest rho in [1, k] with 1 - (1 - beta(rho))**k <= rho * beta(rho), by bisection.

    The condition holds at rho = k (Bernoulli: (1 - b)^k >= 1 - k b), and the set where it
    holds is an interval [rho*, k]: as rho grows, beta falls so the left side falls, while
    rho * beta = sum min(rho q, p) grows. The returned rho always satisfies the condition
    (it is the upper end of the final bracket), at most (k - 1) / 2**iters above rho*.
    k == 1 -> 1.0.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == 1:
        return 1.0  # 1 - (1 - b) = b <= 1 * b always
    p_s, q_s = _on_q_support(p, q)
    if _condition_holds(p_s, q_s, k, 1.0):
        return 1.0  # e.g. p == q: beta(1) = 1 and 1 - 0 <= 1
    low, high = 1.0, float(k)  # invariant: fails at low, holds at high
    for _ in range(iters):
        mid = 0.5 * (low + high)
        if _condition_holds(p_s, q_s, k, mid):
            high = mid
        else:
            low = mid
    return high


def kseq_residual(p: torch.Tensor, q: torch.Tensor, *, rho: float, k: int) -> torch.Tensor:
    """[vocab], [vocab] -> [vocab] float64: the exact K-SEQ residual for k candidates at rho.

    r ∝ max(0, p - c * min(q, p/rho)) with c = (1 - (1 - beta)^k) / beta; c <= rho whenever
    rho satisfies the kseq_rho condition, and at the exact root c == rho, where r is
    norm(max(0, p - rho q)). If nothing is left (rounding), or beta == 0 (disjoint supports:
    no candidate can be accepted, c is irrelevant), this is p.
    """
    p64 = p.to(torch.float64)  # [vocab]
    q64 = q.to(torch.float64)  # [vocab]
    accept_mass = torch.minimum(q64, p64 / rho)  # [vocab]; per-candidate P(draw x and accept)
    b = float(accept_mass.sum())
    if not b > 0:
        return p64  # disjoint supports: every candidate is rejected, so out ~ p directly
    c = (1.0 - (1.0 - b) ** k) / b  # sum_{i<k} (1 - b)^i: expected tries that could accept
    residual = torch.clamp(p64 - c * accept_mass, min=0.0)  # [vocab]; clamp only trims rounding
    mass = residual.sum()
    if not mass > 0:
        return p64  # (1 - b)^k ~ 0: the residual is (numerically) never reached
    return residual / mass


def kseq_select(
    *,
    candidates: Sequence[int],
    p: torch.Tensor,
    q: torch.Tensor,
    generator: torch.Generator,
) -> tuple[int | None, int]:
    """K-SEQ at one position.

    candidates: k iid samples from q. p, q: [vocab] dense target and draft distributions
    (callers densify a SparseDist first).
    Returns (index of the accepted candidate or None, committed token).

    Candidate i (in order) is accepted with probability min(1, p(x_i) / (rho q(x_i))); the
    first acceptance wins. If none is accepted, sample from the residual (kseq_residual).

    Lossless: let m(x) = min(q(x), p(x)/rho) and beta = sum_x m(x). One candidate is
    drawn as x and accepted with probability q(x) min(1, p(x)/(rho q(x))) = m(x), and is
    accepted at all with probability beta, independently across candidates. So
        P(first acceptance at i, token x) = (1 - beta)^(i-1) m(x)
        P(some candidate accepted, token x) = m(x) sum_{i=1..k} (1 - beta)^(i-1) = c m(x),
            c = (1 - (1 - beta)^k) / beta
        P(none accepted) = (1 - beta)^k.
    With r(x) = (p(x) - c m(x)) / (1 - beta)^k, which is >= 0 because c <= rho and
    m <= p/rho, and sums to (1 - c beta) / (1 - beta)^k = 1:
        P(out = x) = c m(x) + (1 - beta)^k r(x) = p(x).
    """
    k = len(candidates)
    vocab = p.shape[-1]
    if p.ndim != 1 or q.shape != p.shape:
        raise ValueError(f"p and q must both be [vocab], got {tuple(p.shape)} and {tuple(q.shape)}")
    p64 = p.to(torch.float64)  # [vocab]
    q64 = q.to(torch.float64)  # [vocab]
    rho = kseq_rho(p64, q64, k) if k > 0 else 1.0
    for index, candidate in enumerate(candidates):
        token = int(candidate)
        if not 0 <= token < vocab:
            raise ValueError(f"candidates[{index}] must be in [0, {vocab}), got {token}")
        q_x = float(q64[token])
        if not q_x > 0:
            raise ValueError(f"q gives candidate {token} zero probability; it cannot have been drafted from q")
        u = float(torch.rand((), dtype=torch.float64, generator=generator, device=generator.device))
        # u < p/(rho q) has probability min(1, p/(rho q)); rho >= 1 shrinks acceptance so k
        # tries together never over-cover p.
        if u * rho * q_x < float(p64[token]):
            return index, token
    # No candidate accepted (k == 0 included: c == 0 and the residual is p itself).
    residual = kseq_residual(p64, q64, rho=rho, k=k) if k > 0 else p64  # [vocab]
    return None, int(torch.multinomial(residual, 1, generator=generator))


@dataclass(frozen=True)
class KSeqResult:
    """What a K-SEQ round commits.

    accepted_len: draft tokens accepted (0..draft_len).
    tokens: ``accepted_len + 1`` tokens, like VerifyResult.tokens.
    source_draft: index of a draft whose first ``accepted_len`` tokens equal the accepted
        ones (the caller keeps that draft's KV cache); None if accepted_len == 0.
    """

    accepted_len: int
    tokens: list[int]
    source_draft: int | None


def _check_drafts(drafts: Sequence[Sequence[int]]) -> int:
    """Return draft_len, or raise ValueError unless there is at least one draft and all share a length."""
    if len(drafts) == 0:
        raise ValueError("drafts must hold at least one draft")
    draft_len = len(drafts[0])
    for i, draft in enumerate(drafts):
        if len(draft) != draft_len:
            raise ValueError(
                f"drafts must share one length, got len(drafts[0]) = {draft_len}, len(drafts[{i}]) = {len(draft)}"
            )
    return draft_len


def verify_kseq(
    *,
    drafts: Sequence[Sequence[int]],
    q: Sequence[torch.Tensor],
    p: Sequence[torch.Tensor],
    generator: torch.Generator,
) -> KSeqResult:
    """K-SEQ over k draft sequences of equal length draft_len, sampled independently from the draft.

    q[i]: [draft_len, vocab] the draft's distribution at each position of draft i.
    p[i]: [draft_len + 1, vocab] target distribution along draft i (row j conditioned on the
        committed prefix + drafts[i][:j]).

    Position by position, the survivors all share the committed prefix, so their p and q
    rows there are one distribution (the first survivor's rows are used), and their next
    tokens are iid from q given everything so far; kseq_select with k' = number of
    survivors therefore commits a token distributed as p. Survivors after a step are those
    whose token equals the committed one. A residual token (no survivor) ends the round; if
    all draft_len positions are accepted, the bonus is sampled from a survivor's p row draft_len.
    """
    draft_len = _check_drafts(drafts)
    k = len(drafts)
    if len(q) != k or len(p) != k:
        raise ValueError(f"q and p must have one entry per draft ({k}), got {len(q)} and {len(p)}")
    for i in range(k):
        if q[i].ndim != 2 or q[i].shape[0] != draft_len:
            raise ValueError(f"q[{i}] must be [draft_len, vocab] = [{draft_len}, vocab], got {tuple(q[i].shape)}")
        if p[i].ndim != 2 or p[i].shape[0] != draft_len + 1:
            raise ValueError(f"p[{i}] must be [draft_len + 1, vocab] = [{draft_len + 1}, vocab], got {tuple(p[i].shape)}")

    survivors = list(range(k))  # drafts equal to the committed tokens so far
    tokens: list[int] = []
    for j in range(draft_len):
        lead = survivors[0]  # every survivor has the same prefix, hence the same rows
        candidates = [int(drafts[i][j]) for i in survivors]  # [k'] iid from q[lead][j]
        index, token = kseq_select(candidates=candidates, p=p[lead][j], q=q[lead][j], generator=generator)
        tokens.append(token)
        if index is None:
            # Residual token: no draft continues the committed sequence, the round ends.
            return KSeqResult(accepted_len=j, tokens=tokens, source_draft=lead if j > 0 else None)
        survivors = [i for i in survivors if int(drafts[i][j]) == token]
    lead = survivors[0]
    bonus = torch.multinomial(p[lead][draft_len].to(torch.float64), 1, generator=generator)
    tokens.append(int(bonus))
    return KSeqResult(accepted_len=draft_len, tokens=tokens, source_draft=lead if draft_len > 0 else None)


def verify_kseq_greedy(
    *,
    drafts: Sequence[Sequence[int]],
    target_argmax: Sequence[Sequence[int]],
) -> KSeqResult:
    """Greedy verification with several candidate drafts.

    target_argmax[i]: draft_len + 1 target argmax ids along draft i. The longest draft prefix
    that matches the target's argmax along that draft wins (ties: the lowest draft index);
    commit it plus the target's next argmax along that draft. Lossless because the target's
    greedy path is unique and any matching prefix lies on it.
    """
    draft_len = _check_drafts(drafts)
    if len(target_argmax) != len(drafts):
        raise ValueError(f"target_argmax must have one entry per draft ({len(drafts)}), got {len(target_argmax)}")
    best_draft, best_len = 0, -1
    for i, (draft, argmax) in enumerate(zip(drafts, target_argmax)):
        if len(argmax) != draft_len + 1:
            raise ValueError(f"target_argmax[{i}] must have draft_len + 1 = {draft_len + 1} entries, got {len(argmax)}")
        matched = 0
        while matched < draft_len and int(draft[matched]) == int(argmax[matched]):
            matched += 1  # the target would have produced this token itself
        if matched > best_len:
            best_draft, best_len = i, matched
    tokens = [int(t) for t in drafts[best_draft][:best_len]] + [int(target_argmax[best_draft][best_len])]
    return KSeqResult(accepted_len=best_len, tokens=tokens, source_draft=best_draft if best_len > 0 else None)
