"""Sampling primitives shared by the draft and the target.

Glossary
--------
draft
    The small model that proposes tokens cheaply; its next-token distribution is ``q``.
target
    The large model whose output distribution ``p`` the service must reproduce exactly.
round
    One draft-then-verify cycle: the draft proposes ``draft_len`` tokens, the target scores
    them in one forward pass, and the verifier commits ``accepted_len + 1`` tokens.
accepted
    A draft token kept by the verifier (probability ``min(1, p(x) / q(x))``).
recovered / residual
    On the first rejection the verifier samples a replacement from the residual
    ``norm(max(0, p - q))`` and the round ends.
bonus token
    When every draft token is accepted, the target's distribution at the next position is
    already computed, so one extra token is sampled from it for free.

Both ``p`` and ``q`` must come from :func:`logits_to_probs` with the *same*
:class:`SamplingParams`; otherwise the verified output follows the wrong distribution.

Penalties (repetition, frequency, presence) change the target distribution itself: the
target's distribution at a position is :func:`penalize` applied to its raw logits, with
counts over the tokens *before that position*. When a block of draft tokens is verified,
row i of the block therefore counts the draft tokens before i too (they are the prefix the
row conditions on); counting only committed tokens would verify against the wrong p.
The draft applies the same processing to its own logits, so q stays the distribution it
sampled from and acceptance stays high.

Papers: Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", arXiv 2211.17192; Chen et al. 2023, "Accelerating Large Language Model Decoding
with Speculative Sampling", arXiv 2302.01318.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "SamplingParams",
    "SparseDist",
    "TokenLogprob",
    "logits_to_probs",
    "make_generator",
    "penalize",
    "sample",
    "token_counts",
    "token_logprobs",
    "truncate_to_sparse",
]

_SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts seeds in [0, 2**64)


def _check_real(name: str, value: object) -> float:
    """Return ``value`` as a finite float, or raise ValueError naming the field."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError(f"{name} must be finite, got {as_float}")
    return as_float


def _check_int(name: str, value: object) -> int:
    """Return ``value`` as an int, or raise ValueError naming the field."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (SamplingParams)


@dataclass(frozen=True)
class SamplingParams:
    """How a request turns logits into a next-token distribution.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it. Temperatures
      below GREEDY_BELOW are taken as 0: dividing float32 logits by them overflows to inf
      (NaN probabilities), and their distribution is the argmax's to within float32 anyway
      (vLLM draws the same line at 1e-5).
    top_k: keep the k largest logits (0 = off).
    top_p: nucleus sampling mass in (0, 1] (1 = off).
    seed: seed for the request's generator (None = nondeterministic).
    min_p: in [0, 1] (0 = off): drop tokens whose probability after temperature is below
      min_p times the most likely token's.
    repetition_penalty: > 0 (1 = off), over prompt and output tokens (CTRL, as vLLM): a seen
      token's logit is divided by it when positive, multiplied by it when negative.
    frequency_penalty, presence_penalty: in [-2, 2] (0 = off), over output tokens (as vLLM
      and OpenAI): logit -= frequency_penalty * count + presence_penalty * (count > 0).
    logprobs: None = off; else every generated token's log-probability under the target's
      raw logits is reported, with this many most likely alternatives.

    Penalties apply to greedy decoding too (the argmax of the penalized logits); see
    :func:`penalize`.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        temperature = _check_real("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature < GREEDY_BELOW:
            temperature = 0.0  # see the docstring: greedy, never inf/NaN
        top_k = _check_int("top_k", self.top_k)
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        top_p = _check_real("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        seed = self.seed
        if seed is not None:
            seed = _check_int("seed", seed)
            if not 0 <= seed < _SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        min_p = _check_real("min_p", self.min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        repetition = _check_real("repetition_penalty", self.repetition_penalty)
        if not repetition > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition}")
        frequency = _check_real("frequency_penalty", self.frequency_penalty)
        presence = _check_real("presence_penalty", self.presence_penalty)
        for name, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        logprobs = self.logprobs
        if logprobs is not None:
            logprobs = _check_int("logprobs", logprobs)
            if logprobs < 0:
                raise ValueError(f"logprobs must be >= 0, got {logprobs}")
        # Normalise numpy scalars and ints so equal params compare and hash equal.
        for name, value in (
            ("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("seed", seed), ("min_p", min_p),
            ("repetition_penalty", repetition), ("frequency_penalty", frequency), ("presence_penalty", presence),
            ("logprobs", logprobs),
        ):
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        """True when the request decodes by argmax (temperature == 0)."""
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """True when a penalty changes the logits (see :func:`penalize`)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., vocab] logits (any float dtype) -> [..., vocab] float32 probabilities.

    ``logits`` are already penalized (:func:`penalize`) when the request has penalties.
    Applies temperature, then min-p, then top-k, then top-p (vLLM's order; min-p and top-k
    commute, as both keep the top token and neither changes the other's choice).
    min-p keeps the tokens whose probability is at least min_p times the top token's.
    top-k keeps every token whose logit ties the k-th largest (as transformers does).
    top-p keeps the smallest set of most likely tokens whose mass is >= top_p (ties in
    logit are broken towards the lower token id) and always keeps the top token.
    Greedy (temperature == 0): one-hot at the argmax; ties go to the lowest index, the
    same as ``torch.argmax``.
    """
    scores = logits.to(torch.float32)  # [..., vocab]
    vocab = scores.shape[-1]
    if params.greedy:
        # Greedy ignores top-k / top-p: the argmax always survives both filters.
        return torch.nn.functional.one_hot(scores.argmax(dim=-1), vocab).to(torch.float32)

    scores = scores / params.temperature  # [..., vocab]
    if params.min_p > 0:
        probs = torch.softmax(scores, dim=-1)  # [..., vocab]
        # p(x) < min_p * max p: dropped (the top token always stays: its ratio is 1)
        scores = scores.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), -math.inf)
    if 0 < params.top_k < vocab:
        kth_largest = torch.topk(scores, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        # Below the k-th largest logit: outside the top-k set.
        scores = scores.masked_fill(scores < kth_largest, -math.inf)
    probs = torch.softmax(scores, dim=-1)  # [..., vocab]

    if params.top_p < 1.0:
        # Order by the tempered logits, not the probs: softmax can round distinct logits to
        # equal probs, and the argmax must come first so it is always kept.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [..., vocab]
        sorted_probs64 = probs.gather(-1, order).to(torch.float64)  # float64: fewer rounding flips
        mass_before = torch.cumsum(sorted_probs64, dim=-1) - sorted_probs64  # [..., vocab]
        # A token is needed only while the more likely tokens hold less than top_p; the
        # first token has mass_before == 0 < top_p, so it is always kept.
        drop_sorted = mass_before >= params.top_p  # [..., vocab]
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [..., vocab]
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # renormalise the nucleus
    return probs


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (where the probabilities it samples from live):
    seeded when ``seed`` is given, else nondeterministic. The same seed gives the same
    stream on the same device type only (CPU and CUDA generators differ)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # draws a fresh nondeterministic seed
    else:
        generator.manual_seed(_check_int("seed", seed))
    return generator


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[..., vocab] probabilities -> [...] int64 token ids, one ``torch.multinomial`` draw per row."""
    rows = probs.reshape(-1, probs.shape[-1])  # [rows, vocab]
    drawn = torch.multinomial(rows, num_samples=1, generator=generator)  # [rows, 1]
    return drawn.reshape(probs.shape[:-1])


@dataclass(frozen=True, eq=False)
class SparseDist:
    """An exact sparse distribution: only ``ids`` have nonzero mass.

    Used to ship a draft's q across the wire without 151,936 floats per token. It is the
    draft's q *exactly* only when the draft sampled its token from this very distribution
    (see :func:`truncate_to_sparse`). ``eq=False``: numpy fields have no scalar ``==``, so
    instances compare by identity.
    """

    ids: np.ndarray  # [n] int64, distinct
    probs: np.ndarray  # [n] float32, sums to 1 (within 1e-5)

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids, dtype=np.int64)
        probs = np.asarray(self.probs, dtype=np.float32)
        if ids.ndim != 1 or probs.shape != ids.shape:
            raise ValueError(f"ids and probs must be 1-D of equal length, got {ids.shape} and {probs.shape}")
        if ids.size == 0:
            raise ValueError("ids must be non-empty")
        if ids.min() < 0:
            raise ValueError(f"ids must be >= 0, got {int(ids.min())}")
        if np.unique(ids).size != ids.size:
            raise ValueError("ids must be distinct")
        if not np.all(np.isfinite(probs)) or probs.min() < 0:
            raise ValueError("probs must be finite and >= 0")
        total = float(probs.sum(dtype=np.float64))
        if abs(total - 1.0) > 1e-5:
            raise ValueError(f"probs must sum to 1 (within 1e-5), got {total}")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "probs", probs)

    def dense(self, vocab_size: int) -> torch.Tensor:
        """The same distribution as a dense [vocab_size] float32 tensor."""
        if int(self.ids.max()) >= vocab_size:
            raise ValueError(f"vocab_size must exceed every id, got {vocab_size} <= {int(self.ids.max())}")
        out = torch.zeros(vocab_size, dtype=torch.float32, device="cpu")  # [vocab]
        out[torch.from_numpy(self.ids)] = torch.from_numpy(self.probs)
        return out


def truncate_to_sparse(probs: torch.Tensor, k: int) -> SparseDist:
    """Keep the k most likely entries of a [vocab] distribution and renormalise.

    Exactness contract: the result is the draft's q only if the draft then samples its
    token from this truncated distribution (the caller does that, e.g. with
    ``sample(dist.dense(vocab), generator)``). Sampling from the full distribution while
    shipping the truncated one makes verification lossy. Zero-probability entries are
    dropped, so fewer than k ids may come back.
    """
    if probs.ndim != 1:
        raise ValueError(f"probs must be 1-D [vocab], got shape {tuple(probs.shape)}")
    k = _check_int("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = torch.topk(probs.to(torch.float64), min(k, probs.shape[0]))  # [k]
    keep = top.values > 0  # zero-mass entries carry nothing
    values = top.values[keep]  # [n]
    ids = top.indices[keep]  # [n]
    if values.numel() == 0:
        raise ValueError("probs must have positive mass")
    values = values / values.sum()  # renormalise in float64, then store float32
    return SparseDist(ids=ids.cpu().numpy().astype(np.int64), probs=values.cpu().numpy().astype(np.float32))


# ----------------------------------------------------------------------------------------
# Penalties: the target distribution of a penalized request
# ----------------------------------------------------------------------------------------


def _columns_of(tokens: Sequence[int], width: int, columns) -> torch.Tensor:
    """[len(tokens)] int64 on the CPU: the logit column of each token id (-1: not among the
    columns). columns: [width] token id of each column (a restricted draft head), or None
    (column == token id). Counting happens on the CPU (a few hundred ids); the counts move to
    the logits' device in :func:`penalize`."""
    ids = torch.as_tensor([int(t) for t in tokens], dtype=torch.long, device="cpu")  # [n]
    if columns is None:
        return torch.where((ids >= 0) & (ids < width), ids, -1)
    columns = torch.as_tensor(columns, dtype=torch.long).cpu()  # [width]
    lookup = torch.full((int(columns.max()) + 1,), -1, dtype=torch.long, device="cpu")  # token id -> column
    lookup[columns] = torch.arange(width, device="cpu")
    inside = (ids >= 0) & (ids < lookup.numel())
    return torch.where(inside, lookup[ids.clamp(0, lookup.numel() - 1)], -1)


def token_counts(tokens: Sequence[int], width: int, columns=None) -> torch.Tensor:
    """[width] float32 on the CPU: how often each logit column's token occurs in ``tokens`` (see
    :func:`penalize` for ``columns``; ids without a column are not counted)."""
    cols = _columns_of(tokens, width, columns)
    return torch.bincount(cols[cols >= 0], minlength=width).to(torch.float32)


def penalize(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    prompt: Sequence[int] | torch.Tensor,
    output: Sequence[int],
    block: Sequence[int] = (),
    columns=None,
) -> torch.Tensor:
    """[n, width] (or [width]) raw logits -> the same shape, float32, penalized (vLLM semantics).

    Row i is the position after ``output + block[:i]``: its counts are the output tokens
    plus the first i tokens of ``block`` (the draft tokens of a block under verification, or
    the tokens a draft already proposed in this call), so ``len(block) >= n - 1``.
    prompt: the prompt's token ids, or their :func:`token_counts` (precomputed once per
    request); only the repetition penalty looks at the prompt.
    columns: [width] token id of each logit column (a restricted draft head), or None.

    repetition_penalty r over prompt and output tokens: a seen token's logit l becomes l / r
    when l > 0, l * r otherwise; then, over output tokens only, l -= frequency_penalty *
    count + presence_penalty * (count > 0). Unpenalized params return ``logits`` unchanged.
    """
    if not params.penalized:
        return logits
    single = logits.ndim == 1
    scores = logits.to(torch.float32)[None] if single else logits.to(torch.float32)  # [n, width]
    n, width = scores.shape
    if len(block) < n - 1:
        raise ValueError(f"block must hold at least n - 1 = {n - 1} tokens for {n} rows, got {len(block)}")
    counts = token_counts(output, width, columns).to(scores.device)[None].repeat(n, 1)  # [n, width]
    for i, col in enumerate(_columns_of(list(block)[: n - 1], width, columns).tolist()):
        if col >= 0:
            counts[i + 1 :, col] += 1.0  # rows after block[i] condition on it
    if params.repetition_penalty != 1.0:
        seen_prompt = prompt if isinstance(prompt, torch.Tensor) else token_counts(prompt, width, columns)  # [width]
        seen_prompt = seen_prompt.to(scores.device)
        seen = (counts > 0) | (seen_prompt > 0)[None]  # [n, width]
        r = params.repetition_penalty
        scores = torch.where(seen, torch.where(scores > 0, scores / r, scores * r), scores)
    if params.frequency_penalty != 0.0:
        scores = scores - params.frequency_penalty * counts
    if params.presence_penalty != 0.0:
        scores = scores - params.presence_penalty * (counts > 0).to(torch.float32)
    return scores[0] if single else scores


# ----------------------------------------------------------------------------------------
# Log-probabilities of generated tokens
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the target's raw logits (before penalties,
    temperature and truncation), and the ``top`` most likely tokens as (id, logprob), most
    likely first. Small on purpose: this, not a vocabulary row, crosses actors."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """[n, vocab] raw target logits, the n tokens chosen at those rows -> n TokenLogprob with
    ``min(top_n, vocab)`` alternatives each (log_softmax in float32)."""
    if logits.ndim != 2 or logits.shape[0] != len(tokens):
        raise ValueError(f"logits must be [len(tokens), vocab] = [{len(tokens)}, vocab], got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)  # [n, vocab]
    index = torch.as_tensor([[int(t)] for t in tokens], dtype=torch.long, device=logp.device)  # [n, 1]
    chosen = logp.gather(-1, index).squeeze(-1).tolist()  # [n]
    k = min(int(top_n), logp.shape[-1])
    if k > 0:
        top = torch.topk(logp, k, dim=-1)
        top_ids, top_lp = top.indices.tolist(), top.values.tolist()  # [n][k]
    else:
        top_ids = top_lp = [[] for _ in tokens]
    return [
        TokenLogprob(logprob=float(lp), top=tuple(zip(ids, vals)))
        for lp, ids, vals in zip(chosen, top_ids, top_lp)
    ]
