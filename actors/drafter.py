"""Draft side: proposes blocks of draft tokens for many requests on one draft model.

Glossary
- block: the draft_len draft tokens proposed in one call, with the draft's distribution q at
  each position (sparse and exact, or None when the request is greedy) and the exit that
  emitted each token.
- sorted drafting (S2D, Kavehzadeh et al., arXiv 2407.01955): for each token run the draft's
  exits in depth order and stop at the first whose max probability reaches that exit's
  threshold; the deepest exit of the policy always emits. q is the distribution of the exit
  that emitted.
- branches (SpecTr, arXiv 2310.15141): k draft sequences continuing the same prefix. For a
  sampled request they are independent samples; for a greedy one they start from the
  draft's k most likely first tokens and continue greedily.

A request's state here is its own KV cache and random generator. Each call says which token
sequence to continue from (the committed tokens, possibly followed by an unverified block in
PEARL's post-verify); the cache is rolled back to the longest prefix it already holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from tandem.actors.batching import PREFILL_CHUNK, Cancellations
from tandem.actors.kv_cache import SequenceState
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import RequestAlreadyOpenError, RequestStateLostError
from tandem.speculation.sampling import (
    SamplingParams,
    SparseDist,
    logits_to_probs,
    make_generator,
    penalize,
    token_counts,
    truncate_to_sparse,
)
from tandem.speculation.sorted_policy import ExitPolicy, should_emit

SPARSE_Q_TOP = 64  # entries of q shipped per draft token (exact: the draft samples from them)


@dataclass(frozen=True)
class DraftBlock:
    """draft_len draft tokens continuing a given sequence."""

    tokens: list[int]
    q: list[SparseDist] | None  # None: greedy request (q is one-hot on `tokens`)
    exits: list[int]  # exit depth that emitted each token
    draft_s: float = 0.0  # wall time of the call
    # tokens of the sequence the call fed before drafting (its cache lacked them): 1 after a
    # round of its own, more after target-only steps (their draft_s is mostly that catch-up)
    caught_up: int = 0


@dataclass(frozen=True)
class DraftBranches:
    """k draft sequences of equal length continuing the same sequence (SpecTr)."""

    branches: list[list[int]]
    q: list[list[SparseDist]] | None  # per branch, per position (None: greedy)
    draft_s: float = 0.0


@dataclass
class _DraftRequest:
    seq: SequenceState
    sampling: SamplingParams
    generator: torch.Generator
    last_used: float = field(default_factory=time.monotonic)
    prompt_len: int | None = None  # leading tokens of every sequence that are the prompt (penalties)
    prompt_counts: dict[int, torch.Tensor] = field(default_factory=dict)  # per exit depth, made at first use


class Drafter:
    """Drafts for any number of requests (of any target) on one multi-exit draft runner."""

    def __init__(self, runner: ModelRunner, *, sparse_top: int = SPARSE_Q_TOP, cancelled: Cancellations | None = None, prefill_chunk: int = PREFILL_CHUNK):
        self.runner = runner
        self.cancelled = cancelled if cancelled is not None else Cancellations()
        self.prefill_chunk = prefill_chunk
        self.sparse_top = sparse_top
        self.requests: dict[str, _DraftRequest] = {}
        self._columns = {e: (c.cpu().numpy() if (c := runner.head_columns(e)) is not None else None) for e in runner.exits}

    # ------------------------------------------------------------------ lifecycle
    def open(self, request_id: str, *, sampling: SamplingParams, capacity: int = 256, prompt_len: int | None = None) -> None:
        """prompt_len: how many leading tokens of the sequences this request drafts after
        are its prompt; with penalties the draft then applies them as the target does
        (better acceptance). None: the draft's q is not penalized (still exact: q is what it
        samples from)."""
        if request_id in self.requests:
            raise RequestAlreadyOpenError(f"request_id {request_id!r} is already open on this drafter")
        seed = None if sampling.seed is None else sampling.seed + 7919  # independent of the target's stream
        # A CPU generator on any device: the draft samples from the sparse q it ships, which
        # is on the CPU already (numpy, ~64 entries), never from a vocabulary row on the device.
        self.requests[request_id] = _DraftRequest(
            seq=self.runner.new_sequence(capacity), sampling=sampling, generator=make_generator(seed, "cpu"), prompt_len=prompt_len
        )

    def close(self, request_id: str) -> bool:
        self.cancelled.discard(request_id)
        return self.requests.pop(request_id, None) is not None

    def live_requests(self) -> list[str]:
        return list(self.requests)

    def _request(self, request_id: str) -> _DraftRequest:
        try:
            req = self.requests[request_id]
        except KeyError:
            raise RequestStateLostError(f"request_id {request_id!r} is not open on this drafter") from None
        req.last_used = time.monotonic()
        return req

    def _catch_up(self, req: _DraftRequest, sequence: Sequence[int], request_id: str) -> list[int]:
        """Roll back to the common prefix; return the tokens still to feed (>= 1). A long
        backlog (the prompt, at a request's first draft) goes through every layer in chunks
        first, and stops between chunks once the request is cancelled."""
        common = self.runner.truncate_to_common_prefix(req.seq, sequence)
        if common == len(sequence):  # everything fed already: re-feed the last token
            common -= 1
            self.runner.rollback(req.seq, common)
        feed = [int(t) for t in sequence[common:]]
        while len(feed) > self.prefill_chunk:
            self.cancelled.check(request_id)
            self.runner.extend(req.seq, feed[: self.prefill_chunk], all_logits=False)
            feed = feed[self.prefill_chunk :]
        return feed

    def unfed(self, request_id: str, sequence: Sequence[int], depth: int | None = None) -> int:
        """At least how many tokens of `sequence` a draft call would have to feed first (the
        tokens past what the request's cache holds; more when they differ earlier); with
        `depth` (an exit), also those whose KV its layers lack (fed earlier only down to a
        shallower exit). Read without the model thread: cheap, and only this request's own
        calls change it."""
        seq = self._request(request_id).seq
        have = len(seq.tokens)
        if depth is not None:
            have = min(have, seq.filled[max(1, min(int(depth), len(seq.filled))) - 1])
        return len(sequence) - have

    def catch_up_batch(self, calls: Sequence[dict]) -> list[int | Exception]:
        """One chunk (prefill_chunk tokens) of each call's backlog, every call's in one
        forward through all layers; a call is {request_id, sequence}. Returns per call the
        tokens still unfed after it (a draft call feeds the last few itself: at least one is
        always left) or its exception (cancelled, not open)."""
        out: list[int | Exception] = [0] * len(calls)
        seqs, chunks, fed = [], [], []
        for i, c in enumerate(calls):
            try:
                self.cancelled.check(c["request_id"])
                req = self._request(c["request_id"])
            except Exception as exc:  # noqa: BLE001 - that request only
                out[i] = exc
                continue
            sequence = [int(t) for t in c["sequence"]]
            common = self.runner.truncate_to_common_prefix(req.seq, sequence)
            n = min(self.prefill_chunk, len(sequence) - common - 1)
            if n > 0:
                seqs.append(req.seq)
                chunks.append(sequence[common : common + n])
            fed.append((i, len(sequence) - common - max(n, 0)))
        if seqs:
            self.runner.forward_to_depth(seqs, chunks, depth=self.runner.num_layers)
        for i, left in fed:
            out[i] = left
        return out

    # ------------------------------------------------------------------ one token
    def _penalized(self, req: _DraftRequest, logits: torch.Tensor, depth: int, history: Sequence[int]) -> torch.Tensor:
        """logits [columns] after `history` (the sequence drafted from, plus the tokens this
        call drafted so far) -> penalized as the target penalizes its own (see penalize)."""
        if not req.sampling.penalized or req.prompt_len is None:
            return logits
        cols = self._columns[depth]
        if depth not in req.prompt_counts:
            req.prompt_counts[depth] = token_counts(history[: req.prompt_len], logits.shape[-1], cols)
        return penalize(logits, req.sampling, prompt=req.prompt_counts[depth], output=history[req.prompt_len :], columns=cols)

    def _emit(
        self, req: _DraftRequest, logits: torch.Tensor, depth: int, history: Sequence[int] = ()
    ) -> tuple[int, SparseDist | None]:
        """logits [columns] at the emitting exit -> (token id, exact sparse q or None). A
        restricted head's q lives on its columns' token ids (zero elsewhere: still exact).
        history: the tokens before this one (for penalties)."""
        cols = self._columns[depth]
        logits = self._penalized(req, logits, depth, history)
        if req.sampling.greedy:
            col = int(torch.argmax(logits))
            return (col if cols is None else int(cols[col])), None
        probs = logits_to_probs(logits, req.sampling)  # [columns]
        sparse = truncate_to_sparse(probs, self.sparse_top)
        # Sample from exactly the distribution we ship: q is then exact (lossless).
        j = int(torch.multinomial(torch.from_numpy(sparse.probs), 1, generator=req.generator))
        ids = sparse.ids if cols is None else cols[sparse.ids]
        return int(ids[j]), SparseDist(ids=ids, probs=sparse.probs)

    def _begin_calls(
        self, calls: Sequence[dict], checks: Sequence[Callable[[], None]], depths: Sequence[int] | None = None,
    ) -> tuple[list[_DraftRequest | None], list[list[int]], dict[int, Exception], list[int]]:
        """Per call of a batch: its check (raises for a bad call), its request, the tokens
        still to feed (_catch_up) and how many it lacked in all down to its deepest exit
        (`depths`, per call; the full depth without), counting tokens an earlier shallower
        exit left out of deeper layers (the runner fills those lazily in this call). A call
        that fails any of them keeps its exception in `failed` (by index); the others go on."""
        reqs: list[_DraftRequest | None] = [None] * len(calls)
        feeds: list[list[int]] = [[] for _ in calls]
        failed: dict[int, Exception] = {}
        lacked = [0] * len(calls)
        for i, (c, check) in enumerate(zip(calls, checks)):
            try:
                check()
                reqs[i] = self._request(c["request_id"])
                lacked[i] = max(1, self.unfed(c["request_id"], c["sequence"], depth=depths[i] if depths else None))
                feeds[i] = self._catch_up(reqs[i], c["sequence"], c["request_id"])
            except Exception as exc:  # noqa: BLE001 - that request only; the others go on
                failed[i] = exc
        return reqs, feeds, failed, lacked

    # ------------------------------------------------------------------ public
    def draft(
        self, request_id: str, sequence: Sequence[int], *, draft_len: int, policy: ExitPolicy | None = None
    ) -> DraftBlock:
        """Propose `draft_len` tokens continuing `sequence` (committed tokens, possibly plus an
        unverified block)."""
        call = {"request_id": request_id, "sequence": sequence, "draft_len": draft_len, "policy": policy}
        block = self.draft_batch([call])[0]
        if isinstance(block, BaseException):
            raise block
        return block

    def draft_batch(self, calls: Sequence[dict]) -> list[DraftBlock | Exception]:
        """Draft for several requests at once, in lockstep: one batched forward per draft
        position and exit depth. Each call is the keyword arguments of `draft` plus request_id
        and sequence; its policy may be single-exit or sorted (several exits, any mix). At each
        position every row still drafting goes down the exits in depth order together: at each
        exit the rows whose policy has it are scored in one head matmul, those that emit leave,
        the rest continue deeper in one forward (a row passing an exit its policy lacks only
        pauses there: same layers, same result). A call's failure (not open, cancelled, a bad
        exit) is returned in its slot; the others go on."""
        t0 = time.perf_counter()
        n = len(calls)
        policies = [c.get("policy") or ExitPolicy.single(self.runner.num_layers) for c in calls]
        reqs, feeds, failed, lacked = self._begin_calls(calls, [lambda p=p: self.check_policy(p) for p in policies],
                                                        [max(p.exits) for p in policies])
        remaining = [0 if i in failed else int(c["draft_len"]) for i, c in enumerate(calls)]
        tokens: list[list[int]] = [[] for _ in calls]
        exits: list[list[int]] = [[] for _ in calls]
        qs: list[list[SparseDist]] = [[] for _ in calls]
        histories = [[] if i in failed else _history(reqs[i], c["sequence"]) for i, c in enumerate(calls)]
        levels = sorted({e for i, p in enumerate(policies) if i not in failed for e in p.exits})
        while True:
            pending = [i for i in range(n) if remaining[i] > 0]  # rows drafting this position
            depth, hidden = 0, {}
            for level in levels:
                if not pending:
                    break
                seqs = [reqs[i].seq for i in pending]
                if depth == 0:
                    out = self.runner.forward_to_depth(seqs, [feeds[i] for i in pending], depth=level)
                else:
                    out = self.runner.continue_batch(seqs, [hidden[i] for i in pending], from_depth=depth, depth=level)
                hidden, depth = dict(zip(pending, out)), level
                scored = [i for i in pending if level in policies[i].exits]
                if not scored:
                    continue
                logits = self.runner.logits_at_exit(torch.cat([hidden[i][-1:] for i in scored]), level)  # [rows, head]
                for row, i in zip(logits, scored):
                    k = policies[i].exits.index(level)
                    if k < len(policies[i].exits) - 1 and not should_emit(policies[i], k, float(torch.softmax(row, dim=-1).max())):
                        continue
                    token, q = self._emit(reqs[i], row, level, histories[i])
                    if histories[i]:
                        histories[i].append(token)
                    tokens[i].append(token)
                    exits[i].append(level)
                    if q is not None:
                        qs[i].append(q)
                    feeds[i] = [token]
                    remaining[i] -= 1
                    pending.remove(i)
            if depth == 0:  # nothing drafted this position: every call is done
                break
        dt = time.perf_counter() - t0
        return [
            failed[i] if i in failed else
            DraftBlock(tokens=tokens[i], q=None if reqs[i].sampling.greedy else qs[i], exits=exits[i], draft_s=dt,
                       caught_up=lacked[i])
            for i in range(n)
        ]

    def draft_branches(self, request_id: str, sequence: Sequence[int], *, draft_len: int, k: int) -> DraftBranches:
        """k sequences of draft_len tokens continuing `sequence`, drafted as one batch of k rows
        (on a memory-bound CPU or GPU, k rows cost about one). The full draft depth is used."""
        out = self.branches_batch([{"request_id": request_id, "sequence": sequence, "draft_len": draft_len, "k": k}])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def branches_batch(self, calls: Sequence[dict]) -> list[DraftBranches | Exception]:
        """SpecTr branches for several requests at once: every call's new tokens in one forward
        through all layers, then each draft position's next token of every branch of every
        call in one batched forward. A call is the keyword arguments of draft_branches plus
        request_id and sequence; its failure (not open, cancelled, k < 1) stays in its slot."""
        t0 = time.perf_counter()
        runner = self.runner
        depth = runner.num_layers
        n = len(calls)
        reqs, feeds, failed, _ = self._begin_calls(calls, [lambda c=c: _check_k(c["k"]) for c in calls])
        live = [i for i in range(n) if i not in failed]
        branches: dict[int, list[list[int]]] = {i: [[] for _ in range(int(calls[i]["k"]))] for i in live}
        qs: dict[int, list[list[SparseDist]]] = {i: [[] for _ in range(int(calls[i]["k"]))] for i in live}
        histories = {i: _history(reqs[i], calls[i]["sequence"]) for i in live}
        seqs: dict[int, list[SequenceState]] = {}
        if live:
            hidden = runner.forward_to_depth([reqs[i].seq for i in live], [feeds[i] for i in live], depth=depth)
            firsts_logits = runner.logits_at_exit(torch.cat([h[-1:] for h in hidden]), depth)  # [calls, head]
            for logits, i in zip(firsts_logits, live):
                req, k = reqs[i], len(branches[i])
                if req.sampling.greedy:
                    scores = self._penalized(req, logits, depth, histories[i])
                    top = torch.topk(scores, min(k, scores.shape[-1])).indices.tolist()
                    top += [top[0]] * (k - len(top))
                    cols = self._columns[depth]
                    for b, col in enumerate(top):
                        branches[i][b].append(col if cols is None else int(cols[col]))
                else:
                    for b in range(k):
                        token, q = self._emit(req, logits, depth, histories[i])
                        branches[i][b].append(token)
                        qs[i][b].append(q)
                # every branch starts from a copy of the shared prefix cache
                seqs[i] = [req.seq] + [runner.fork(req.seq) for _ in range(k - 1)]
        for step in range(1, max((int(calls[i]["draft_len"]) for i in live), default=0)):
            rows = [(i, b) for i in live if int(calls[i]["draft_len"]) > step for b in range(len(branches[i]))]
            if not rows:
                break
            out = runner.extend_batch([seqs[i][b] for i, b in rows], [[branches[i][b][-1]] for i, b in rows], all_logits=False)
            for (i, b), logits in zip(rows, out):
                history = histories[i] + branches[i][b] if histories[i] else ()
                token, q = self._emit(reqs[i], logits[-1], depth, history)
                branches[i][b].append(token)
                if q is not None:
                    qs[i][b].append(q)
        for i in live:
            for extra in seqs[i][1:]:
                runner.release(extra)  # the request keeps branch 0's cache
        dt = time.perf_counter() - t0
        return [
            failed[i] if i in failed else
            DraftBranches(branches=branches[i], q=None if reqs[i].sampling.greedy else qs[i], draft_s=dt)
            for i in range(n)
        ]

    def check_policy(self, policy: ExitPolicy) -> None:
        for e in policy.exits:
            if e not in self.runner.exits:
                raise ValueError(f"exit {e} is not an exit of the draft (exits: {list(self.runner.exits)})")


def _check_k(k) -> None:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _history(req: _DraftRequest, sequence: Sequence[int]) -> list[int]:
    """The tokens before the next draft token, as a list the caller extends as it drafts;
    empty (nothing copied) when the request's draft applies no penalties."""
    if not req.sampling.penalized or req.prompt_len is None:
        return []
    return [int(t) for t in sequence]
