"""Lossless verification of one block of draft tokens (standard speculative sampling).

Glossary
--------
draft
    The small model that proposed ``draft_tokens``; its distribution at position i is
    ``q[i]``.
target
    The large model; ``p[i]`` is its distribution at position i given the committed prefix
    plus ``draft_tokens[:i]`` (row ``draft_len`` is the position after the last draft token).
round
    One call here: ``draft_len`` draft tokens in, ``accepted_len + 1`` committed tokens out.
accepted
    Draft token x_i kept with probability ``min(1, p_i(x_i) / q_i(x_i))``.
recovered / residual
    On the first rejection, a replacement sampled from the residual
    ``norm(max(0, p_i - q_i))``; the round stops there.
bonus token
    If all ``draft_len`` draft tokens are accepted, one more token sampled from ``p[draft_len]``.

Why it is lossless (Leviathan et al. 2023, arXiv 2211.17192, Theorem 1; Chen et al. 2023,
arXiv 2302.01318): for x ~ q, P(accept and out = x) = q(x) min(1, p(x)/q(x)) = min(p, q)(x),
and P(reject) = sum_x max(0, q - p)(x) = sum_x max(0, p - q)(x), so
P(out = x) = min(p, q)(x) + max(0, p - q)(x) = p(x).

Greedy is the same rule with one-hot p and q (:func:`verify_greedy` does it on ids).
The functions here are pure: they return what to commit; the caller rolls back KV caches
and updates request state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.speculation.sampling import SparseDist

__all__ = ["VerifyResult", "residual_distribution", "verify_block", "verify_greedy"]


@dataclass(frozen=True)
class VerifyResult:
    """What a round commits.

    accepted_len: how many draft tokens were accepted (0..draft_len).
    tokens: the accepted draft tokens, then exactly one more (the recovered token on
        rejection, the bonus token if all were accepted); ``len == accepted_len + 1``.
    """

    accepted_len: int
    tokens: list[int]


def verify_greedy(draft_tokens: Sequence[int], target_argmax: Sequence[int]) -> VerifyResult:
    """Greedy verification on token ids.

    ``target_argmax`` has ``len(draft_tokens) + 1`` entries: the target's argmax at each
    draft position plus the bonus position. Accept while equal, then append the target's
    argmax at the first mismatch (or the bonus position).
    """
    draft_len = len(draft_tokens)
    if len(target_argmax) != draft_len + 1:
        raise ValueError(
            f"target_argmax must have len(draft_tokens) + 1 = {draft_len + 1} entries, got {len(target_argmax)}"
        )
    accepted_len = 0
    while accepted_len < draft_len and int(draft_tokens[accepted_len]) == int(target_argmax[accepted_len]):
        accepted_len += 1  # the target would have picked this very token
    tokens = [int(t) for t in draft_tokens[:accepted_len]] + [int(target_argmax[accepted_len])]
    return VerifyResult(accepted_len=accepted_len, tokens=tokens)


def residual_distribution(p_row: torch.Tensor, q_row: torch.Tensor) -> torch.Tensor:
    """[vocab], [vocab] -> [vocab]: norm(max(0, p - q)), the distribution to sample on reject.

    The output has the dtype of ``p_row``. If the residual has no mass (p == q up to
    rounding, so rejection had probability ~0), returns ``p_row`` itself.
    """
    residual = torch.clamp(p_row - q_row.to(p_row.dtype), min=0.0)  # [vocab]
    mass = residual.sum()
    if not mass > 0:  # p <= q everywhere: rejection was (numerically) impossible
        return p_row
    return residual / mass


def _dense_q_row(q: torch.Tensor | Sequence[SparseDist], index: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Row ``index`` of q as a dense float64 [vocab] tensor on ``device`` (p's), whichever
    form q came in (a SparseDist arrives from the draft as numpy)."""
    row = q[index]
    if isinstance(row, SparseDist):
        row = row.dense(vocab)
    return row.to(device=device, dtype=torch.float64)


def _check_block(draft_tokens: Sequence[int], q: torch.Tensor | Sequence[SparseDist], p: torch.Tensor) -> None:
    """Raise ValueError unless the shapes of a block agree."""
    draft_len = len(draft_tokens)
    if p.ndim != 2 or p.shape[0] != draft_len + 1:
        raise ValueError(f"p must be [draft_len + 1, vocab] = [{draft_len + 1}, vocab], got {tuple(p.shape)}")
    if len(q) != draft_len:
        raise ValueError(f"q must have draft_len = {draft_len} rows, got {len(q)}")
    if isinstance(q, torch.Tensor) and (q.ndim != 2 or (draft_len > 0 and q.shape[1] != p.shape[1])):
        raise ValueError(f"q must be [draft_len, vocab] = [{draft_len}, {p.shape[1]}], got {tuple(q.shape)}")
    vocab = p.shape[1]
    for i, token in enumerate(draft_tokens):
        if not 0 <= int(token) < vocab:
            raise ValueError(f"draft_tokens[{i}] must be in [0, {vocab}), got {int(token)}")


def verify_block(
    *,
    draft_tokens: Sequence[int],
    q: torch.Tensor | Sequence[SparseDist],
    p: torch.Tensor,
    generator: torch.Generator,
) -> VerifyResult:
    """Standard speculative sampling over one block.

    draft_tokens: draft_len ids, x_i drawn from q[i].
    q: [draft_len, vocab] dense draft probabilities, or a list of draft_len :class:`SparseDist`.
    p: [draft_len + 1, vocab] target probabilities (already through ``logits_to_probs`` with the
        request's params).

    For i in order: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); on the first
    reject sample from norm(max(0, p_i - q_i)) and stop; if all are accepted sample the bonus
    from p[draft_len]. draft_len == 0 just samples the bonus. Committed tokens follow p exactly.
    Dense and sparse q consume the generator identically, so they give identical results.
    """
    _check_block(draft_tokens, q, p)
    draft_len = len(draft_tokens)
    vocab = p.shape[1]
    p64 = p.to(torch.float64)  # [draft_len + 1, vocab]; float64 keeps p/q ratios exact enough
    tokens: list[int] = []
    for i in range(draft_len):
        token = int(draft_tokens[i])
        q_row = _dense_q_row(q, i, vocab, p.device)  # [vocab]
        q_x = float(q_row[token])
        if not q_x > 0:
            raise ValueError(f"q[{i}] gives draft token {token} zero probability; it cannot have been drafted from q")
        p_x = float(p64[i, token])
        u = float(torch.rand((), dtype=torch.float64, generator=generator, device=generator.device))
        # u < p/q happens with probability min(1, p/q); written as u * q < p to avoid dividing.
        if u * q_x < p_x:
            tokens.append(token)
            continue
        # Rejected: the residual supplies exactly the mass that acceptance under-covers.
        recovered = torch.multinomial(residual_distribution(p64[i], q_row), 1, generator=generator)
        tokens.append(int(recovered))
        return VerifyResult(accepted_len=i, tokens=tokens)
    # All draft_len accepted: p[draft_len] is already computed, so the bonus token is free.
    bonus = torch.multinomial(p64[draft_len], 1, generator=generator)
    tokens.append(int(bonus))
    return VerifyResult(accepted_len=draft_len, tokens=tokens)
