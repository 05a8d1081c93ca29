"""Target side: verifies draft blocks for many requests on one target model.

Glossary
- committed: tokens the request has output (prompt excluded) plus the prompt; only the target
  side commits, so it is the source of truth for a request's sequence.
- pending logits: the target's logits for the token after the last committed one, kept when
  every committed token has been fed (after a prefill, or after a block was accepted in full
  without a bonus token). The next verification needs no extra forward for that position.
- bonus: when every draft token is accepted, standard speculative decoding samples one more
  token from the last row. PEARL's post-verify skips it: the draft has already continued
  past the block, and its next token is verified against that row instead.

Verification runs here (not in the orchestrator) so that only token ids and sparse q cross
the wire, never [draft_len + 1, vocab] target probabilities.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from tandem.actors.batching import PREFILL_CHUNK, Cancellations
from tandem.actors.drafter import DraftBlock, DraftBranches
from tandem.actors.kv_cache import ContextLengthError, SequenceState
from tandem.actors.prefix_cache import MIN_REUSE, PrefixCache
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import RequestAlreadyOpenError, RequestStateLostError
from tandem.speculation.sampling import (
    SamplingParams,
    TokenLogprob,
    logits_to_probs,
    make_generator,
    penalize,
    sample,
    token_counts,
    token_logprobs,
)
from tandem.speculation.spectr import verify_kseq, verify_kseq_greedy
from tandem.speculation.verify import verify_block, verify_greedy


@dataclass(frozen=True)
class VerifyOutcome:
    """What one verification committed."""

    accepted_len: int  # draft tokens accepted
    tokens: list[int]  # newly committed tokens (accepted, then recovered/bonus unless skipped)
    drafted: int  # draft tokens that were checked
    target_s: float = 0.0  # wall time of the call
    # rows of the target forward it ran in: every sequence of that batch, packed (the runner's
    # forward_rows; 0: no forward, or unknown); the goodput policy prices forwards by their rows
    step_rows: int = 0
    branch: int | None = None  # SpecTr: the branch whose prefix was accepted
    # sampling.logprobs set: one per token, from the raw logits of the row it was chosen at
    logprobs: list[TokenLogprob] | None = None


def run_steps(step: Callable[[], VerifyOutcome], n: int, stop_ids: Sequence[int]) -> list[VerifyOutcome]:
    """step() up to n times (at least once), stopping after an outcome that holds a token in
    stop_ids. A failure after the first step ends the run early with the steps already
    committed (the next call meets the failure again: a cancel, a lost request); a failure
    of the first is raised."""
    stops = frozenset(int(s) for s in stop_ids)
    outcomes: list[VerifyOutcome] = []
    for _ in range(max(1, int(n))):
        try:
            outcomes.append(step())
        except Exception:
            if not outcomes:
                raise
            break
        if stops.intersection(outcomes[-1].tokens):
            break
    return outcomes


@dataclass
class _TargetRequest:
    seq: SequenceState
    sampling: SamplingParams
    generator: torch.Generator
    committed: list[int]
    pending: torch.Tensor | None = None  # [vocab] logits after the last committed token
    last_used: float = field(default_factory=time.monotonic)
    prompt_len: int = 0  # committed[:prompt_len] is the prompt, the rest output (penalties)
    prompt_counts: torch.Tensor | None = None  # token_counts of the prompt, made at first use
    prefilling: bool = False  # opened, prompt not yet all fed (chunked prefill, Verifier.step)
    reused: int = 0  # prompt positions taken from the prefix cache at open


class Verifier:
    """Verifies draft blocks (sd, sorted, pearl) and branches (spectr) for many requests."""

    def __init__(
        self, runner: ModelRunner, *, cancelled: Cancellations | None = None, prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache: PrefixCache | None = None,
    ):
        self.runner = runner
        self.requests: dict[str, _TargetRequest] = {}
        self.cancelled = cancelled if cancelled is not None else Cancellations()
        self.prefill_chunk = prefill_chunk
        # prompts' KV kept for later prompts that open the same way (None: none kept)
        self.prefix_cache = prefix_cache

    # ------------------------------------------------------------------ lifecycle
    def begin(
        self, request_id: str, prompt: Sequence[int], *, sampling: SamplingParams, prompt_len: int | None = None,
        capacity: int | None = None,
    ) -> None:
        """Open a request without running the model: its prompt is fed later, a chunk per
        step() (prefills=[request_id]), mixed into other requests' verification forwards.
        prompt_len: how many leading tokens of `prompt` are the request's prompt (a resumed
        request re-prefills its output too, which penalties still count as output); None:
        all of them. capacity: KV positions to allocate at once (what admission reserved for
        the request), so the cache never grows; None: the prompt plus 128, grown by doubling."""
        if len(prompt) == 0:
            raise ValueError("prompt must hold at least one token")
        if request_id in self.requests:
            raise RequestAlreadyOpenError(f"request_id {request_id!r} is already open on this target")
        if len(prompt) > self.runner.max_context:
            raise ContextLengthError(
                f"a prompt of {len(prompt)} tokens exceeds the target's context of {self.runner.max_context} tokens"
            )
        seq = self.runner.new_sequence(max(int(capacity), len(prompt) + 1) if capacity else len(prompt) + 128)
        reuse = 0
        if self.prefix_cache is not None:
            entry, shared = self.prefix_cache.longest(prompt)
            reuse = self._reusable(len(prompt), shared, entry.prompt_len) if entry is not None else 0
            if reuse:
                self.prefix_cache.fill(seq, entry, reuse)
        self.requests[request_id] = _TargetRequest(
            seq=seq,
            sampling=sampling,
            generator=make_generator(sampling.seed, self.runner.device),  # p lives on the runner's device
            committed=[int(t) for t in prompt],
            prompt_len=len(prompt) if prompt_len is None else max(0, min(int(prompt_len), len(prompt))),
            prefilling=True,
            reused=reuse,
        )

    def open(
        self, request_id: str, prompt: Sequence[int], *, sampling: SamplingParams, prompt_len: int | None = None,
        capacity: int | None = None,
    ) -> float:
        """begin() then prefill the whole prompt, chunk by chunk, alone; returns the wall
        time. A request cancelled meanwhile stops at the next chunk and is freed."""
        t0 = time.perf_counter()
        self.begin(request_id, prompt, sampling=sampling, prompt_len=prompt_len, capacity=capacity)
        try:
            left = len(prompt)
            while left:
                _, (left,) = self.step([], [], prefills=[request_id])
                if isinstance(left, BaseException):
                    raise left
        except BaseException:
            self.drop(request_id)
            raise
        return time.perf_counter() - t0

    def _reusable(self, prompt_len: int, shared: int, entry_len: int) -> int:
        """Positions of a prefix shared with a cached prompt of entry_len tokens that this
        prompt may take: not its last token (its logits are needed), and only what every
        row computes alike either way. Chunks keep their boundaries (multiples of
        prefill_chunk), so positions before the chunk holding the cut were computed in whole
        chunks both ways; inside it, the cached prompt's chunk, this prompt's whole chunk and
        the rows still to compute must be of one runner.rows_kind(), else the cut moves back
        until they are (at worst to the chunk's start). 0: none."""
        n = min(shared, prompt_len - 1)
        start = n - n % self.prefill_chunk
        if n > start:
            kind = self.runner.rows_kind
            whole = min(self.prefill_chunk, prompt_len - start)
            if kind(whole) != kind(min(self.prefill_chunk, entry_len - start)):
                n = start
            else:
                rest = whole - (n - start)
                while rest < whole and kind(rest) != kind(whole):
                    rest += 1
                n = start + whole - rest
        return n if n >= MIN_REUSE else 0

    def close(self, request_id: str) -> bool:
        self.cancelled.discard(request_id)
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.runner.release(req.seq)
        return req is not None

    def drop(self, request_id: str) -> None:
        """Free a request whose open failed or was cancelled; unlike close, a cancel mark
        stays, so work still queued for it keeps failing fast."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.runner.release(req.seq)

    def live_requests(self) -> list[str]:
        return list(self.requests)

    def committed(self, request_id: str) -> list[int]:
        return list(self._request(request_id).committed)

    def _request(self, request_id: str) -> _TargetRequest:
        try:
            req = self.requests[request_id]
        except KeyError:
            raise RequestStateLostError(f"request_id {request_id!r} is not open on this target") from None
        req.last_used = time.monotonic()
        return req

    # ------------------------------------------------------------------ verification
    def _rows_for(self, req: _TargetRequest, draft_tokens: list[int]) -> tuple[list[int], int]:
        """Tokens to feed (unfed committed + draft) and how many leading output rows to drop."""
        if req.prefilling:
            raise RuntimeError("the request is still prefilling; verify after its open returns")
        unfed = req.committed[req.seq.length :]
        if req.pending is not None:
            assert not unfed
        return unfed + draft_tokens, max(len(unfed) - 1, 0)

    def verify(self, request_id: str, block: DraftBlock | None, *, bonus: bool = True) -> VerifyOutcome:
        """Verify a block (None or empty = plain autoregressive step) and commit the result."""
        out = self.verify_batch([request_id], [block], bonus=[bonus])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def steps(self, request_id: str, n: int, *, stop_ids: Sequence[int] = ()) -> list[VerifyOutcome]:
        """Up to n target-only steps in one call (speculation/plan.py TARGET_STEPS_PER_CALL),
        one outcome each, exactly as n verify(None) calls would give them (run_steps)."""
        return run_steps(lambda: self.verify(request_id, None), n, stop_ids)

    def verify_batch(
        self,
        request_ids: Sequence[str],
        blocks: Sequence[DraftBlock | None],
        *,
        bonus: Sequence[bool] | None = None,
    ) -> list[VerifyOutcome | Exception]:
        """Verify one block per request in a single batched target forward. A request that
        cannot be verified (unknown id, context full, malformed block) gets its exception in
        its slot and is left untouched; the others go ahead."""
        return self.step(request_ids, blocks, bonus=bonus)[0]

    def step(
        self,
        request_ids: Sequence[str],
        blocks: Sequence[DraftBlock | DraftBranches | None],
        *,
        bonus: Sequence[bool] | None = None,
        prefills: Sequence[str] = (),
    ) -> tuple[list[VerifyOutcome | Exception], list[int | Exception]]:
        """One batched target forward: a verification block for each of request_ids (as
        verify_batch; DraftBranches: SpecTr's k branches, k rows of the forward on copies of
        the request's cache, as verify_branches) and the next prompt chunk (prefill_chunk
        tokens) of each request in `prefills` (opened with begin). Chunk rows need only
        their last row's logits, kept as the request's pending logits once its prompt is all
        fed. Returns the verification outcomes and, per prefill, the prompt tokens still to
        feed (0: done) or its exception (cancelled, unknown); a failure stays in its own slot."""
        t0 = time.perf_counter()
        bonus = list(bonus) if bonus is not None else [True] * len(request_ids)
        n = len(request_ids)
        results: list[VerifyOutcome | Exception | None] = [None] * n
        reqs: list[_TargetRequest | None] = [None] * n
        # a request's draft(s): one block, or SpecTr's branches (each on its own copy of the cache)
        drafts = [b.branches if isinstance(b, DraftBranches) else [list(b.tokens) if b is not None else []] for b in blocks]
        feeds: list[list[list[int]]] = [[] for _ in range(n)]  # per request, per branch
        seqs_of: list[list[SequenceState]] = [[] for _ in range(n)]
        drops = [0] * n
        for i, rid in enumerate(request_ids):
            try:
                req = self._request(rid)
                feed = []
                for d in drafts[i]:
                    f, drop = self._rows_for(req, list(d))
                    feed.append(f)
                if req.seq.length + max(len(f) for f in feed) > self.runner.max_context:
                    raise ContextLengthError(
                        f"request {rid!r} would exceed the target's context of {self.runner.max_context} tokens"
                    )
            except Exception as exc:  # noqa: BLE001 - this request only
                results[i] = exc
                continue
            reqs[i], feeds[i], drops[i] = req, feed, drop
            seqs_of[i] = [req.seq] + [self.runner.fork(req.seq) for _ in feed[1:]]
        lefts: list[int | Exception] = [0] * len(prefills)
        chunks: list[tuple[int, _TargetRequest, list[int]]] = []
        for j, rid in enumerate(prefills):
            try:
                self.cancelled.check(rid)
                req = self._request(rid)
                if not req.prefilling:
                    raise RuntimeError(f"request {rid!r} has no prompt left to prefill")
            except Exception as exc:  # noqa: BLE001 - this request only
                lefts[j] = exc
                continue
            start = req.seq.length  # a multiple of prefill_chunk unless a prefix was reused
            chunks.append((j, req, req.committed[start : start - start % self.prefill_chunk + self.prefill_chunk]))
        fed = [(i, b) for i in range(n) if reqs[i] is not None for b, f in enumerate(feeds[i]) if f]
        outs: list[list[torch.Tensor | None]] = [[None] * len(f) for f in feeds]
        if fed or chunks:
            seqs = [seqs_of[i][b] for i, b in fed] + [req.seq for _, req, _ in chunks]
            rows_in = [feeds[i][b] for i, b in fed] + [chunk for _, _, chunk in chunks]
            all_logits = [True] * len(fed) + [False] * len(chunks)
            logits = self.runner.extend_batch(seqs, rows_in, all_logits=all_logits)
            for (i, b), lg in zip(fed, logits):
                outs[i][b] = lg
            for (j, req, _), lg in zip(chunks, logits[len(fed) :]):
                left = len(req.committed) - req.seq.length
                if left == 0:
                    req.prefilling, req.pending = False, lg[-1]
                    if self.prefix_cache is not None:
                        self.prefix_cache.keep(req.seq, req.committed, self.runner.kv_bytes_per_token)
                lefts[j] = left
        dt = time.perf_counter() - t0
        step_rows = self.runner.forward_rows([len(r) for r in ([feeds[i][b] for i, b in fed] + [c for _, _, c in chunks])])
        for i, req in enumerate(reqs):
            if req is None:
                continue
            per_branch = []
            for out in outs[i]:
                rows = out[drops[i] :] if out is not None else None  # [draft_len (+1), vocab]
                if req.pending is not None:
                    rows = req.pending[None] if rows is None else torch.cat([req.pending[None], rows])
                per_branch.append(rows)  # [draft_len + 1, vocab]: the target's logits at each draft position + the next
            try:
                if isinstance(blocks[i], DraftBranches):
                    out = self._commit_branches(req, blocks[i], seqs_of[i], per_branch)
                else:
                    out = self._commit(req, drafts[i][0], blocks[i], per_branch[0], bonus[i])
                results[i] = VerifyOutcome(**{**out.__dict__, "target_s": dt, "step_rows": step_rows})
            except Exception as exc:  # noqa: BLE001 - e.g. a malformed q from a bad draft
                for extra in seqs_of[i][1:]:
                    if extra is not req.seq:
                        self.runner.release(extra)
                self.runner.rollback(req.seq, min(req.seq.length, len(req.committed)))
                results[i] = exc
        return results, lefts  # type: ignore[return-value]

    def _scores(self, req: _TargetRequest, rows: torch.Tensor, draft: Sequence[int]) -> torch.Tensor:
        """[draft_len + 1, vocab] raw rows along `draft` -> the target's processed logits there:
        penalized with counts over the output *and the draft tokens before each row* (the
        prefix each row conditions on), which keeps verification lossless; unchanged
        without penalties."""
        if not req.sampling.penalized:
            return rows
        if req.prompt_counts is None:
            req.prompt_counts = token_counts(req.committed[: req.prompt_len], rows.shape[-1])
        return penalize(rows, req.sampling, prompt=req.prompt_counts, output=req.committed[req.prompt_len :], block=draft)

    @staticmethod
    def _logprobs(req: _TargetRequest, rows: torch.Tensor, tokens: list[int]) -> list[TokenLogprob] | None:
        """Committed token j was chosen at row j (accepted draft tokens, then the recovered or
        bonus token), so its logprob comes from that raw row; None unless requested."""
        if req.sampling.logprobs is None or not tokens:
            return None
        return token_logprobs(rows[: len(tokens)], tokens, req.sampling.logprobs)

    def _commit(
        self, req: _TargetRequest, draft: list[int], block: DraftBlock | None, rows: torch.Tensor, bonus: bool
    ) -> VerifyOutcome:
        draft_len = len(draft)
        scores = self._scores(req, rows, draft)  # [draft_len + 1, vocab]
        if req.sampling.greedy:
            result = verify_greedy(draft, scores.argmax(dim=-1).tolist())
        else:
            p = logits_to_probs(scores, req.sampling)  # [draft_len + 1, vocab]
            if draft_len == 0:
                result = verify_greedy([], [int(sample(p[0], req.generator))])
            else:
                result = verify_block(draft_tokens=draft, q=block.q, p=p, generator=req.generator)
        accepted = result.accepted_len
        base = len(req.committed)
        tokens = result.tokens
        if accepted == draft_len and draft_len > 0 and not bonus:
            tokens = tokens[:-1]  # post-verify: the draft continues from here
            req.pending = rows[draft_len]
        else:
            req.pending = None
        logprobs = self._logprobs(req, rows, tokens)  # before committing: rows follow the old prefix
        req.committed.extend(tokens)
        # KV: committed prefix + accepted draft tokens were fed and stay valid.
        self.runner.rollback(req.seq, min(req.seq.length, base + accepted))
        return VerifyOutcome(accepted_len=accepted, tokens=tokens, drafted=draft_len, logprobs=logprobs)

    def verify_branches(self, request_id: str, branches: DraftBranches) -> VerifyOutcome:
        """SpecTr: verify k branches in one batched forward (k rows) and commit the winner."""
        out = self.step([request_id], [branches])[0][0]
        if isinstance(out, Exception):
            raise out
        return out

    def _commit_branches(
        self, req: _TargetRequest, branches: DraftBranches, seqs: list[SequenceState], rows: list[torch.Tensor]
    ) -> VerifyOutcome:
        """rows: per branch [draft_len + 1, vocab] along it; seqs: the request's cache (branch
        0) and its copies, each fed its branch. Keeps the winner's cache, frees the others."""
        scores = [self._scores(req, r, br) for r, br in zip(rows, branches.branches)]  # penalized along each branch
        if req.sampling.greedy:
            res = verify_kseq_greedy(drafts=branches.branches, target_argmax=[s.argmax(-1).tolist() for s in scores])
        else:
            vocab = rows[0].shape[-1]
            q = [torch.stack([d.dense(vocab) for d in qb]).to(self.runner.device) for qb in branches.q]
            p = [logits_to_probs(s, req.sampling) for s in scores]
            res = verify_kseq(drafts=branches.branches, q=q, p=p, generator=req.generator)
        winner = res.source_draft if res.source_draft is not None else 0
        base = len(req.committed)
        req.seq = seqs[winner]  # keep the winning branch's cache
        for i, s in enumerate(seqs):
            if i != winner:
                self.runner.release(s)
        req.pending = None
        # the committed tokens lie along the winner (row 0, the shared prefix's, if none won)
        logprobs = self._logprobs(req, rows[winner], list(res.tokens))
        req.committed.extend(res.tokens)
        self.runner.rollback(req.seq, min(req.seq.length, base + res.accepted_len))
        return VerifyOutcome(
            accepted_len=res.accepted_len,
            tokens=list(res.tokens),
            drafted=len(branches.branches[0]),
            branch=res.source_draft,
            logprobs=logprobs,
        )
