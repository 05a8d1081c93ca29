"""Goodput policy: per target, pick the draft exit and the draft length (0 = speculation
off) that maximise expected committed tokens per second, from live acceptance and step
times (SmartSpec, Liu et al., arXiv 2406.14066).

Past ~400 lines on purpose: the round model, the live estimates it reads and the rules that
act on them (trials, moves, refreshes, probes) are one unit, each constant beside the
measurement that set it; split, each half would need the other's internals.

Glossary
- arm: one draft exit (a depth of the shared sorted draft) for one target.
- acceptance by position: a_i = P(draft position i accepted | positions < i accepted), an
  exponential moving average per arm over observed rounds.
- a request's own acceptance (RequestAcceptance): its rounds per arm, which its re-plans weigh
  against the arm's long-run estimate (an EMA at LONG_RUN_ALPHA, over many requests) taken as
  OWN_PRIOR_ROUNDS rounds, and aged by the target-only steps it ran since (half-life
  OWN_HALF_LIFE_STEPS): a hard stretch turns one request off, and it drafts again once that
  stretch is behind it, later the more rounds said off.
- expected tokens per round with draft_len drafts: E(draft_len) = 1 + sum_{i<=draft_len} prod_{j<=i} a_j
  (accepted drafts plus the one token the target always commits).
- round time: sequential (sd) draft_len * d + V(draft_len + 1); overlapped (pearl)
  max(draft_len * d, V(draft_len + 1)), with d the draft step time of the arm and V(k) the target's
  verification time for a block of k rows.
- V(k) is measured live per block size. A block size not yet seen is predicted from the
  nearest one seen (or the target-only step, k = 1), scaled by the target's cost curve
  `block_costs` (its forward time per block size, measured once by the target actor,
  actors/block_costs.py). On a GPU or a bf16 CPU target the curve is nearly flat, so longer
  drafts are cheap; a 4-bit CPU kernel works in tiles of 4 rows (a block of 5-8 rows costs
  about twice one of 1-4), and the draft length follows that step.
- rate = E(draft_len) / round time; speculation off has rate 1 / V(1) (one token per step).
- Concurrency (continuous batching): with c requests running on one target actor, their
  blocks share each forward, so a step verifies c (draft_len + 1) rows and a target-only
  step c rows. A request's rate is then E(draft_len) / round time with V(c (draft_len + 1)),
  against 1 / V(c) off (the choice is priced as if every running request took it). V is
  learned per number of rows in the forward (`step_rows`, reported by the target), so a
  target-only step that ran beside other requests' draft blocks is priced at its real rows,
  a forward of c > 1 requests is priced from their own target-only step V(c) scaled along
  the curve (_forward_time: c requests cost more than one request's block of as many rows),
  and `batch_costs` (the target's forward time for c sequences of draft_len + 1 rows,
  measured once) extends the curve past one request's block. On a 4-bit CPU target, whose
  time grows with rows, speculation stops paying as concurrency grows; on a GPU, whose
  forward costs about the same for 1 or 100 rows, it keeps paying.
- In turn under load (not overlapped, c > 1): the draft and the target share the node's cores
  and take turns on them (actors/core_turns.py), so while one request drafts every request
  on the node waits. A round is then priced as one request drafting beside c - 1 target-only
  steps: the node commits (c - 1) + E(draft_len) tokens in draft_len * d + V(c + draft_len),
  a request's share 1/c of that, against 1 / V(c) off. Measured through gRPC on the 2-core
  AMX host (8 code requests in flight, 1.5B pack): the all-drafting model kept exploring
  shallow exits at one draft a round (predicted 1.1x off), and `auto` ran 33 tok/s against
  off's 43; `sd` for all 8 ran 31.

Exploration: each arm, and speculation off, is tried before it is trusted: a choice hands
one request to each untried option (a request runs many rounds; `min_samples` of them make
it tried), deepest exit first, then off (only where no cost curve prices off from the
forwards seen: off_known). Requests planned while those trials run (many
arrive at once under load) go to the best tried option, or off while nothing is known: one
untried arm is never handed to a whole burst of requests. A request planned off is on
standby (Choice.standby: the deepest exit while nothing is known, else the best one at its
load): it runs a drafting loop whose rounds are target-only steps until a re-plan
(round_choice) says drafting pays at that round's load, so a burst planned before the
trials reported, or off at a load that later drops, drafts once it should instead of
running off for life. Every `explore_every`-th choice tries the option with the fewest
samples, so a change in traffic or load (which moves d and V) is noticed. A trial,
exploration or probe of an arm runs only at a load where a round of it could pay at the
acceptance a request may plausibly reach there (the best of its recent requests' own, every
draft accepted until a few ended: PLAUSIBLE_REQUESTS), and, in turn, at up to
PROBE_MAX_CONCURRENCY in flight (may_probe): a round at a higher load is a wait for every
request on the node. A round that resumes drafting after a request's target-only steps is
priced with its draft first feeding their tokens (feed_s per token, measured on the rounds
that did; round_choice's catch_up). Under heavy load measured step
times grow (batched verification, a busy draft pool), so the chosen draft length shrinks and
speculation turns itself off once it no longer pays.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass
class _Ema:
    alpha: float
    value: float | None = None
    count: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
        self.count += 1


def reached_positions(drafted: int, accepted: int) -> list[bool]:
    """Per draft position a round reached (every earlier one accepted): whether it was
    accepted. What a_i counts, for an arm (ArmStats) and for one request (RequestAcceptance)."""
    return [i < accepted for i in range(min(accepted + 1, drafted))]


@dataclass
class ArmStats:
    """Live statistics of one exit for one target."""

    alpha: float
    accept: list[_Ema] = field(default_factory=list)  # per draft position
    # the same per position over many requests (LONG_RUN_ALPHA): what a request's own rounds
    # are weighed against (acceptance(own=...))
    long_run: list[_Ema] = field(default_factory=list)
    draft_step_s: _Ema | None = None
    # draft time per token a draft call fed before drafting (DraftBlock.caught_up), from rounds
    # that fed more than CAUGHT_UP_PRICED: what a round after target-only steps pays first
    feed_s: _Ema | None = None
    # recent requests' own acceptance here (GoodputPolicy.end_request): what a probe may hope for
    requests: deque = field(default_factory=lambda: deque(maxlen=PLAUSIBLE_REQUESTS))
    rounds: int = 0
    seen_at: int = 0  # the policy's target-only steps (ar_steps) at this arm's last round
    refresh_steps: int = 0  # target-only steps between its refresh rounds now (0: REFRESH_STEPS)
    unprobed: int = 0  # first rounds refused a probe only by plausible_acceptance since the last that ran

    def __post_init__(self) -> None:
        if self.draft_step_s is None:
            self.draft_step_s = _Ema(self.alpha)
        if self.feed_s is None:
            self.feed_s = _Ema(self.alpha)

    def observe(self, *, drafted: int, accepted: int, draft_s: float, caught_up: int = 0) -> None:
        self.rounds += 1
        for emas, alpha in ((self.accept, self.alpha), (self.long_run, LONG_RUN_ALPHA)):
            while len(emas) < drafted:
                # a position past the first starts from what was predicted of it (acceptance():
                # the last seen position's value), so that one rejection there does not read as
                # acceptance 0 at it and at every position past it, which then would never be
                # drafted again to correct it (seen through gRPC: a 0.0 at position 7 capped the
                # draft length at 6 where 95% were accepted)
                seen = [e.value for e in emas if e.value is not None]
                emas.append(_Ema(alpha, value=seen[-1] if seen else None))
            for i, ok in enumerate(reached_positions(drafted, accepted)):
                emas[i].add(1.0 if ok else 0.0)
        d = self.draft_step_s.value
        if drafted > 0 and caught_up > CAUGHT_UP_PRICED and d is not None:
            self.feed_s.add(max(0.0, draft_s - drafted * d) / caught_up)
        if drafted > 0 and caught_up <= CAUGHT_UP_PRICED:
            # a call that first caught up on tokens the draft missed (target-only steps before
            # it) is mostly that catch-up: priced per draft token it read 52 ms for 25 and kept
            # a target off (seen through gRPC); such rounds teach acceptance only, and the
            # feed's time per token (feed_s)
            self.draft_step_s.add(draft_s / drafted)

    def plausible_acceptance(self) -> float:
        """The acceptance per position a request on this arm may plausibly reach: the best of
        the last PLAUSIBLE_REQUESTS requests' own (end_request), 1.0 until
        PLAUSIBLE_MIN_REQUESTS of them ended."""
        return max(self.requests) if len(self.requests) >= PLAUSIBLE_MIN_REQUESTS else 1.0

    def end_request(self, own: RequestAcceptance, prior: float) -> None:
        """A request that drafted here ended: its acceptance over the positions it reached, each
        weighed against the arm's long-run estimate as its re-plans weighed it (acceptance(own=)),
        kept for plausible_acceptance."""
        reached = sum(own.reached)
        if reached <= 0:
            return
        seen = [e.value for e in self.long_run if e.value is not None]
        base = sum(seen) / len(seen) if seen else prior
        self.requests.append((sum(own.accepted) + OWN_PRIOR_ROUNDS * base) / (reached + OWN_PRIOR_ROUNDS))

    def acceptance(self, draft_len: int, prior: float, own: RequestAcceptance | None = None) -> list[float]:
        """a_1..a_draft_len; unseen positions repeat the last seen one (or the prior). With
        `own`, one request's rounds on this arm: at each position it reached, its own counts
        weighed against the arm's long-run estimate taken as OWN_PRIOR_ROUNDS rounds of
        evidence (the recent one, at one request at a time, is mostly those same rounds)."""
        seen = [e.value for e in (self.accept if own is None else self.long_run) if e.value is not None]
        last = seen[-1] if seen else prior
        values = [(seen[i] if i < len(seen) else last) for i in range(draft_len)]
        if own is not None:
            for i in range(min(draft_len, len(own.reached))):
                values[i] = (values[i] * OWN_PRIOR_ROUNDS + own.accepted[i]) / (OWN_PRIOR_ROUNDS + own.reached[i])
        return values


@dataclass
class RequestAcceptance:
    """One request's own rounds on one arm: per draft position, the rounds that reached it and
    those that accepted it (RoundPlanner keeps one per arm a request drafts from)."""

    reached: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def add(self, *, drafted: int, accepted: int) -> None:
        while len(self.reached) < drafted:
            self.reached.append(0)
            self.accepted.append(0)
        for i, ok in enumerate(reached_positions(drafted, accepted)):
            self.reached[i] += 1
            self.accepted[i] += int(ok)

    def aged(self, steps: int) -> RequestAcceptance:
        """These rounds weighed as `steps` target-only steps after them: halved every
        OWN_HALF_LIFE_STEPS, so a hard stretch that turned the request off fades back to its
        arm's long-run estimate and the request drafts again, later the more rounds said off."""
        if steps <= 0:
            return self
        w = 0.5 ** (steps / OWN_HALF_LIFE_STEPS)
        return RequestAcceptance(reached=[r * w for r in self.reached], accepted=[a * w for a in self.accepted])


# Speculation is chosen only when predicted at least this much faster than off: the round
# model errs under load (measured through gRPC, 8 requests in flight on the 1.5B pack: a
# choice predicted at about off's rate ran at 0.86-0.96x of off), and speculation that does
# not pay must not run.
MIN_GAIN = 0.1

PRIOR_ACCEPTANCE = 0.8  # per-position acceptance assumed before any round of a request is seen
# A drafting round after a round of its own feeds the draft 1-2 tokens (the correction or
# bonus, and the last draft token); one that fed more is not timed as a draft step.
CAUGHT_UP_PRICED = 2
# While a round's re-plan says off, an arm not seen for this many target-only steps drafts one
# round anyway (at least REFRESH_LEN tokens, so that more than its first position is
# re-measured): its EMAs would otherwise keep a short bad stretch for good (seen through gRPC:
# acceptance at position 1 read 0.64 after two rejections where 95% were accepted, and a
# target ran off from then on). Each refresh that still finds off doubles the arm's interval
# up to MAX_REFRESH_STEPS (a refresh round, its draft catching up on the steps it missed,
# cost ~4% of off at every 48 steps on chat prompts, where off is right, and ~3% still with
# the doubling from 48); a round that finds drafting pays resets it.
REFRESH_STEPS = 96
MAX_REFRESH_STEPS = 1536
# A probe (a trial, an exploration, a refresh, a request's first round) runs only where a round
# could pay at the acceptance a request may plausibly reach on its arm: the best of its last
# PLAUSIBLE_REQUESTS requests' own (each weighed against the arm's long-run estimate as its
# re-plans weighed it), once PLAUSIBLE_MIN_REQUESTS ended there; before that, every draft
# accepted. Seen through gRPC on the 2-core EPYC (1.5B pack on ggml, 1 request at a time): a
# round of exit 12 could pay only were ~all of its drafts accepted (3 drafts in 230 ms against a
# 65 ms step), its requests reached 0.3-0.75, and each request's first-round probe, its draft
# first fed the prompt, cost ~0.2 s: `auto` ran 0.78-0.94x of off. Every PLAUSIBLE_REQUESTS-th
# request refused its first-round probe only by that bound probes anyway (where every draft
# accepted could pay), so that the bound follows a change of traffic (code requests after a
# run of chat ones) at ~1/16 of the probes' cost.
PLAUSIBLE_REQUESTS = 16
PLAUSIBLE_MIN_REQUESTS = 3
REFRESH_LEN = 4
# A request's own rounds decide its next ones, its arm's long-run estimate (EMAs at
# LONG_RUN_ALPHA, taught by every request) counting as this many rounds of its own:
# acceptance differs per prompt far more than within one (seen through gRPC on code prompts:
# one prompt at ~50% at position 1 pulled the shared EMAs from 0.97 to 0.51, and the next two
# prompts, at ~97%, ran off at 0.6x of their first pass).
OWN_PRIOR_ROUNDS = 3
# The long-run estimate's EMA weight: ~50 rounds, about two code requests at one request at a
# time, so that one request's hard stretch barely moves what its own rounds are weighed
# against (at alpha 0.2, the recent estimate is those same rounds: seen through gRPC, a code
# request whose first 5 rounds were rejected ran off for its last 60 tokens, 0.64x of `sd`,
# because its own rounds and the shared estimate both said off).
LONG_RUN_ALPHA = 0.02
# A request's own rounds weigh half as much after this many of its target-only steps: what
# turned it off was a stretch of its text that many tokens behind (same request: accepted
# again from ~token 20; before, a code request ran off for its last 86 tokens after 3
# rejected rounds, where the same prompt had run 1.2x off drafting short blocks).
OWN_HALF_LIFE_STEPS = 16
# A request's first round drafts (at least REFRESH_LEN tokens from its arm) even where its
# arm's estimate says off, when at most this many requests share the target: its own
# acceptance is then known from its first round (above) at the cost of one round. Drafting in
# turn with the target, trials, explorations and refresh rounds too run only at up to this
# many in flight (GoodputPolicy.may_probe).
PROBE_MAX_CONCURRENCY = 2
# A request is planned onto an arm shallower than the full draft, or moves to one shallower
# than its own, only once that arm has this many rounds (the full draft, or a deeper arm:
# min_samples): a shallow arm's 3-round trial can be lucky (0.84-1.0 at a 9 ms step where
# its later rounds found ~0.3), and a request that moved there moves no more (seen through
# gRPC: code requests planned onto exit 8 after its trial, and one moved there from the full
# draft, ran off at ~0.7x of the others).
SHALLOW_ARM_ROUNDS = 8
# Every this many rounds of an arm, a re-planned round drafts one token past its best length:
# positions past it are reached by no other round, so one bad stretch there would cap the
# draft length for good (seen through gRPC: 0.55 at position 4, stale, held an arm whose
# first three positions were 97-99% accepted at 3 drafts a round).
LENGTH_PROBE_EVERY = 8


def round_rate(
    acceptance: Sequence[float], *, draft_step_s: float, verify_s: float, overlapped: bool, feed_s: float = 0.0,
) -> float:
    """Predicted tokens/s of rounds drafting len(acceptance) tokens: E / round time, the round
    sequential (feed + draft_len d + V) or overlapped (max(feed + draft_len d, V)); `feed_s`:
    the time its draft call first feeds tokens it missed (0: none beyond its last round's)."""
    drafting = len(acceptance) * draft_step_s + feed_s
    t = max(drafting, verify_s) if overlapped else drafting + verify_s
    return expected_tokens(acceptance) / t if t > 0 else 0.0


def planned_draft_len(
    block_costs: Sequence[float], draft_step_s: float, *, max_draft_len: int, acceptance: float = PRIOR_ACCEPTANCE,
    overlapped: bool = False,
) -> int:
    """The draft length with the best predicted rate before live acceptance is known, from the
    target's verification time per block size (block_costs[k - 1]: k rows) and the draft's step."""
    longest = min(max_draft_len, len(block_costs) - 1)
    if longest < 1:
        raise ValueError(f"block_costs must cover at least 2 rows and max_draft_len be >= 1, got {len(block_costs)}, {max_draft_len}")
    return max(
        range(1, longest + 1),
        key=lambda g: round_rate([acceptance] * g, draft_step_s=draft_step_s, verify_s=block_costs[g], overlapped=overlapped),
    )


def expected_tokens(acceptance: Sequence[float]) -> float:
    """E = 1 + sum_i prod_{j<=i} a_j: tokens committed per round."""
    total, reach = 1.0, 1.0
    for a in acceptance:
        reach *= a
        total += reach
    return total


@dataclass(frozen=True)
class Choice:
    exit: int | None  # None: speculation off
    draft_len: int  # 0 when off
    rate: float  # predicted tokens per second
    exploring: bool = False
    # with exit None: the exit a request planned off may draft from once a round's re-plan
    # says it pays (round_choice(..., standby=True)); None: it stays off (off's own trials)
    standby: int | None = None


class GoodputPolicy:
    """Thread-safe; one instance per target."""

    def __init__(
        self,
        *,
        exits: Sequence[int],
        max_draft_len: int,
        overlapped: bool = True,
        alpha: float = 0.2,
        prior_acceptance: float = PRIOR_ACCEPTANCE,
        min_samples: int = 3,
        explore_every: int = 8,
        min_gain: float = MIN_GAIN,
        block_costs: Sequence[float] | None = None,
        batch_costs: Mapping[int, float] | None = None,
    ):
        if not exits:
            raise ValueError("exits must name at least one draft exit")
        if max_draft_len < 1:
            raise ValueError(f"max_draft_len must be >= 1, got {max_draft_len}")
        self.exits = tuple(sorted(int(e) for e in exits))
        self.max_draft_len = int(max_draft_len)
        self.overlapped = overlapped
        self.prior = prior_acceptance
        self.min_samples = min_samples
        self.explore_every = explore_every
        self.min_gain = float(min_gain)
        self.arms = {e: ArmStats(alpha=alpha) for e in self.exits}
        if block_costs is not None and (not block_costs or any(not c > 0 for c in block_costs)):
            raise ValueError(f"block_costs must be positive forward times for blocks of 1, 2, ... rows, got {list(block_costs)}")
        self.block_costs = tuple(float(c) for c in block_costs) if block_costs else None
        if batch_costs and any(int(k) < 1 or not v > 0 for k, v in batch_costs.items()):
            raise ValueError(f"batch_costs must map rows >= 1 to positive forward times, got {dict(batch_costs)}")
        # the cost curve's points (rows -> seconds): block_costs for 1..n rows, batch_costs beyond
        points = dict(enumerate(self.block_costs or (), start=1))
        points.update({int(k): float(v) for k, v in (batch_costs or {}).items()})
        # a forward of fewer rows never costs more than one of more (it could be padded to
        # them): a point above a later one is noise, so each is capped by every later one (seen
        # on `tandem serve` start-up, 2-core host: 229 ms for 3 rows between 77 ms for 2 and 96
        # for 4; that server's `auto` ran 0.95x off on code prompts, where servers with a rising
        # curve ran 1.37-1.55x)
        capped, cap = [], float("inf")
        for rows, cost in sorted(points.items(), reverse=True):
            cap = min(cap, cost)
            capped.append((rows, cap))
        self._points = sorted(capped)
        self._alpha = alpha
        # rows in the target forward a verification ran in -> its time. Rows: the target's
        # step_rows when it reports them (every sequence in that forward), else the block's own
        self.verify_s: dict[int, _Ema] = {}
        self.ar_steps = 0  # target-only steps observed
        self._choices = 0
        self._explorations = 0
        self._trials: set[int | None] = set()  # options (None: off) handed to a request to try
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ observations
    def observe_round(
        self, *, exit: int | None, drafted: int, accepted: int, draft_s: float, verify_s: float, step_rows: int = 0,
        caught_up: int = 0,
    ) -> None:
        """One round: `verify_s` the target forward's time, `step_rows` the rows in that forward
        (all its sequences, padded; 0: unknown, taken as this round's block of drafted + 1);
        `caught_up` the tokens its draft call fed before drafting (DraftBlock.caught_up)."""
        with self._lock:
            if drafted > 0 and exit not in self.arms:  # a round drafted elsewhere (unknown exit): it prices nothing here
                return
            rows = int(step_rows) if step_rows > 0 else drafted + 1
            self.verify_s.setdefault(rows, _Ema(self._alpha)).add(verify_s)
            if drafted == 0:  # a target-only step
                self.ar_steps += 1
                return
            self.arms[exit].observe(drafted=drafted, accepted=accepted, draft_s=draft_s, caught_up=caught_up)
            self.arms[exit].seen_at = self.ar_steps

    # ------------------------------------------------------------------ prediction
    def curve(self, rows: int) -> float | None:
        """The measured cost curve at `rows` rows (None without one): linear between its
        points; past the last one, along the curve's mean slope from its first point (its last
        segment alone may be one tile's jump; measured batch points keep it honest)."""
        pts = self._points
        if not pts:
            return None
        if rows <= pts[0][0] or len(pts) == 1:
            return pts[0][1]
        for (r0, c0), (r1, c1) in zip(pts, pts[1:]):
            if rows <= r1:
                return c0 + (c1 - c0) * (rows - r0) / (r1 - r0)
        (r0, c0), (r1, c1) = pts[0], pts[-1]
        return c1 + max(0.0, (c1 - c0) / (r1 - r0)) * (rows - r1)

    def _relative_cost(self, rows: int, base: int) -> float:
        a, b = self.curve(rows), self.curve(base)
        return a / b if a and b else 1.0

    def verify_time(self, rows: int) -> float | None:
        """Predicted time of a target forward of `rows` rows: as observed at that size, else the
        nearest size observed scaled by the cost curve (None when nothing is known)."""
        seen = {k: e.value for k, e in self.verify_s.items() if e.value is not None}
        if not seen:
            return None
        if rows in seen:
            return seen[rows]
        near = min(seen, key=lambda k: (abs(k - rows), k))
        return seen[near] * self._relative_cost(rows, near)

    def _forward_time(self, sequences: int, rows: int) -> float | None:
        """Predicted time of a target forward of `sequences` requests' `rows` rows. With more
        than one request it is anchored at their target-only forward (V(sequences)) and scaled
        along the cost curve: a forward of 8 requests costs more than one request's block of
        as many rows (each its own KV cache), so a block of 9 rows timed at one request must
        not price 8 requests' 9 (seen through gRPC, 8 code requests in flight: one request's
        9-row block at 123 ms priced a round of 1 draft under 8 requests' target-only step at
        150 ms, and requests on standby drafted at 8 in flight, `auto` at 0.90x of off)."""
        if sequences > 1:
            base = self.verify_time(sequences)
            if base is not None:
                return base * self._relative_cost(rows, sequences)
        return self.verify_time(rows)

    def rate(
        self, exit: int, draft_len: int, concurrency: int = 1, own: RequestAcceptance | None = None, catch_up: int = 0,
    ) -> float:
        """Predicted tokens/s of one request on an arm with draft_len drafts while
        `concurrency` requests (itself included) share the target's forwards: all drafting
        so where drafting overlaps verification, one drafting beside the others' target-only
        steps where they take turns on shared cores (module docstring); 0.0 when nothing is
        known. With `own`, at that request's own acceptance on the arm (ArmStats.acceptance);
        with `catch_up`, for a round whose draft first feeds that many tokens it missed (the
        request's target-only steps since its last round), at the arm's measured feed_s."""
        arm = self.arms[exit]
        d = arm.draft_step_s.value
        if d is None:
            return 0.0
        feed = catch_up * (arm.feed_s.value or 0.0)
        return self._rate_at(arm.acceptance(draft_len, self.prior, own), d, concurrency, feed)

    def _rate_at(self, acceptance: Sequence[float], d: float, concurrency: int, feed_s: float = 0.0) -> float:
        """rate() of rounds drafting len(acceptance) tokens at draft step d, their draft first
        feeding for feed_s (0.0 while V is unknown)."""
        draft_len, c = len(acceptance), max(1, concurrency)
        all_draft = self.overlapped or c == 1  # else in turn under load: one drafts while c - 1 step
        v = self._forward_time(c, c * (draft_len + 1) if all_draft else c + draft_len)
        if v is None:
            return 0.0
        if all_draft:
            return round_rate(acceptance, draft_step_s=d, verify_s=v, overlapped=self.overlapped, feed_s=feed_s)
        return (c - 1 + expected_tokens(acceptance)) / (c * (draft_len * d + feed_s + v))  # module docstring

    def may_probe(self, exit: int, concurrency: int = 1) -> bool:
        """Whether a round that measures arm `exit` (a trial's, an exploration's, a refresh, a
        request's first-round probe) may run at this load: only where a round of it could pay
        at the acceptance a request may plausibly reach there (_could_pay), and, drafting in
        turn with the target, only at up to PROBE_MAX_CONCURRENCY in flight. Such a round at a higher load stalls every other
        request on the node, and its draft first feeds the tokens the request ran without it
        (its prompt, at a trial's first round), a cost the round model does not price (seen
        with `tandem batch --engine pools`, 8 records in flight on the 2-core AMX host: ~25
        trial, exploration and probe rounds per run, their draft calls feeding 45-100 tokens
        first, ran `auto` at 0.86-0.90x of off; through gRPC, exit 8, 8.4 ms a draft step
        measured alone, explored at 8 in flight where the bound allowed it: 0.90-0.93x)."""
        c = max(1, int(concurrency))
        with self._lock:
            return self._may_probe(exit, c)

    def _may_probe(self, exit: int, c: int) -> bool:
        return (self.overlapped or c <= PROBE_MAX_CONCURRENCY) and self._could_pay(exit, c)

    def _could_pay(self, exit: int, c: int, acceptance: float | None = None) -> bool:
        """Whether a round drafting from `exit` could pay (MIN_GAIN over off) at load c at the
        acceptance a request may plausibly reach there (ArmStats.plausible_acceptance: every
        draft accepted until PLAUSIBLE_MIN_REQUESTS requests ended on it), at the arm's
        measured draft step: where it could not, no round a probe might measure would make
        drafting pay there (at one request: a draft step of 0.2 s against 0.1 s to verify; or
        requests that reached 0.3-0.75 where only ~1.0 pays). `acceptance`: at that one instead.
        True while the step, off or V is unknown."""
        off = self.off_rate(c)
        arm = self.arms[exit]
        d = arm.draft_step_s.value
        if not off or d is None:
            return True
        a = arm.plausible_acceptance() if acceptance is None else acceptance
        best = max(self._rate_at([a] * g, d, c) for g in range(1, self.max_draft_len + 1))
        return not best or best > off * (1 + self.min_gain)  # 0.0: V unknown

    def best_draft_len(self, exit: int, concurrency: int = 1) -> tuple[int, float]:
        best = max(range(1, self.max_draft_len + 1), key=lambda g: self.rate(exit, g, concurrency))
        return best, self.rate(exit, best, concurrency)

    def off_rate(self, concurrency: int = 1) -> float:
        """Predicted tokens/s of one request with speculation off, `concurrency` requests
        stepping the target together (one row each); 0.0 while unknown (off_known)."""
        v = self.verify_time(max(1, concurrency)) if self.off_known() else None
        return 1.0 / v if v else 0.0

    def off_known(self) -> bool:
        """Whether off's rate can be predicted: from target-only steps seen, or from the measured
        cost curve (a forward of any rows seen, scaled along it: verify_time). With a curve, off
        needs no trial of its own: that trial ran a whole request off (seen through gRPC: the
        5th request after start at 13.9 tok/s where the others drafted at 18-20)."""
        return self.ar_steps > 0 or not self._off_needs_trial()

    def _off_needs_trial(self) -> bool:
        """Off is tried and explored as an option of its own only where no cost curve prices it."""
        return not self._points

    def end_request(self, own: Mapping[int, RequestAcceptance]) -> None:
        """A re-planned request ended: its own rounds per arm (RoundPlanner.own) tell what a
        request may plausibly reach there (ArmStats.plausible_acceptance)."""
        with self._lock:
            for exit, mine in own.items():
                if exit in self.arms:
                    self.arms[exit].end_request(mine, self.prior)

    def end_trial(self, option: int | None) -> None:
        """The request trying `option` (an exit; None: off) ended. A trial that saw fewer than
        min_samples of its rounds goes to the next request: otherwise the option stays untried
        for good (seen through gRPC: an 8-token first request held the full draft's trial for
        2 rounds; auto then never drafted from it and ran 0.65x of sd on code)."""
        with self._lock:
            seen = self.ar_steps if option is None else self.arms[option].rounds  # choose() hands out only these
            if seen < self.min_samples:
                self._trials.discard(option)

    # ------------------------------------------------------------------ decision
    def _trusted(self, exit: int, *, than: int) -> bool:
        """Whether a request on arm `than` may be planned onto or moved to `exit`: min_samples
        rounds for an arm at least as deep, SHALLOW_ARM_ROUNDS for a shallower one."""
        return self.arms[exit].rounds >= (self.min_samples if exit >= than else SHALLOW_ARM_ROUNDS)

    def choose(self, concurrency: int = 1) -> Choice:
        """The exit and draft length (exit None: off) with the best predicted rate for a
        request that will run beside `concurrency - 1` others on one target actor."""
        with self._lock:
            self._choices += 1
            c = max(1, int(concurrency))
            # 1. one request to each option not yet tried (deepest exit first, then off where no
            # cost curve prices it), until min_samples of its rounds are seen; meanwhile the
            # others go to what is known. A trial waits for a load at which it may run
            # (_may_probe).
            for e in [*reversed(self.exits)] + ([None] if self._off_needs_trial() else []):
                seen = self.ar_steps if e is None else self.arms[e].rounds
                if seen < self.min_samples and e not in self._trials and (e is None or self._may_probe(e, c)):
                    self._trials.add(e)
                    return Choice(exit=e, draft_len=0 if e is None else min(4, self.max_draft_len), rate=0.0,
                                  exploring=True)
            tried = [e for e in self.exits if self.arms[e].rounds >= self.min_samples]
            if not tried or not self.off_rate(c):
                # nothing known yet: off, the safe default, on standby for the deepest exit: its
                # rounds draft once the trials show drafting pays
                return Choice(exit=None, draft_len=0, rate=0.0, standby=self.exits[-1])
            # 2. exploitation, with periodic exploration
            off = self.off_rate(c)
            trusted = [e for e in tried if self._trusted(e, than=self.exits[-1])] or tried
            scored = [(self.best_draft_len(e, c), e) for e in trusted]
            (draft_len, rate), exit = max(scored, key=lambda item: item[0][1])
            if self.explore_every and self._choices % self.explore_every == 0:
                self._explorations += 1
                if rate <= off * (1 + self.min_gain) and not self._may_probe(exit, c):
                    # no re-measure at this load (_may_probe): off, on standby
                    return Choice(exit=None, draft_len=0, rate=off, standby=exit)
                if rate <= off * (1 + self.min_gain) and self._explorations % 2:
                    # while speculation is off, every other exploration re-measures the arm it
                    # would use: its EMAs forget within ~5 rounds, so a short run of bad rounds
                    # (a hard stretch of text, a slow moment of the draft actor) could otherwise
                    # keep a target off for good, the least seen arms being the others (seen
                    # through gRPC: `auto` off for a whole 5-request run after its warm-up)
                    return Choice(exit=exit, draft_len=draft_len, rate=rate, exploring=True)
                # the least observed option, speculation off included where no cost curve prices it
                options = [(self.arms[e].rounds, e) for e in self.exits] + ([(self.ar_steps, -1)] if self._off_needs_trial() else [])
                _, least = min(options)
                if least == -1:
                    return Choice(exit=None, draft_len=0, rate=off, exploring=True)
                if self._may_probe(least, c):
                    g, r = self.best_draft_len(least, c)
                    return Choice(exit=least, draft_len=g, rate=r, exploring=True)
            if rate <= off * (1 + self.min_gain):
                return Choice(exit=None, draft_len=0, rate=off, standby=exit)
            return Choice(exit=exit, draft_len=draft_len, rate=rate)

    def round_choice(
        self, exit: int, planned: int, concurrency: int = 1, *, standby: bool = False, move: bool = False,
        own: Mapping[int, RequestAcceptance] | None = None, first: bool = False, catch_up: int = 0,
    ) -> tuple[int, int]:
        """(exit, draft tokens) for the next round of a request planned onto `exit` with up to
        `planned` drafts (its KV was sized for that), re-planned at the load of this round
        (`concurrency` requests per target actor, itself included): its best draft length
        there, or (exit, 0), a target-only step, when speculation is not predicted MIN_GAIN
        faster than off. So one planned alone keeps drafting when others join only while it
        pays, and drafts again when they leave. With `move`, every tried arm is priced and the
        best one is returned: a request whose trial (or exploration) of an arm has ended, or
        whose arm turned out worse than it looked (a shallow arm after a lucky trial), moves
        to the best arm (a shallower one only once it has SHALLOW_ARM_ROUNDS rounds)
        instead of running the rest of its tokens on that arm or off (seen
        through gRPC: each exploring request of a 5-request run went off after 3 rounds, at
        0.7x of the others). A request moves once (RoundPlanner): each move to a deeper exit
        makes the draft run its deeper layers over the tokens it skipped, a cost this round
        model does not price (moving every round ran at half of off). Until its arm is
        known the plan stands (the request may be that arm's trial); until off is known too (off_known),
        drafting is not weighed against off, and a `standby` request (planned off,
        Choice.standby) stays off. Where off wins, an arm unseen for REFRESH_STEPS (doubling
        while off keeps winning) target-only steps drafts one round of at least REFRESH_LEN
        (refreshing its estimates); where drafting wins,
        every LENGTH_PROBE_EVERY-th round of the arm drafts one token more than its best.
        `own`: the request's own rounds per arm (RequestAcceptance, aged by its target-only
        steps since), which weigh in its arms' acceptance against their long-run estimates
        (OWN_PRIOR_ROUNDS); `first`: it has drafted no round yet, and then drafts one where
        off wins too (unless more than CAUGHT_UP_PRICED target-only steps of its own came
        first), at a load of at most PROBE_MAX_CONCURRENCY, where a round could pay at the
        acceptance its arm's requests plausibly reach (_could_pay; every PLAUSIBLE_REQUESTS-th
        first round refused only by that probes anyway). `catch_up`: the target-only steps it
        ran since its last drafting round (or its start), whose tokens this round's draft
        feeds first: such a round is priced with that feed (rate's catch_up)."""
        # a first round that comes after target-only steps (it waited for its arm's trial or a
        # lighter load) is no probe: its draft would first feed them too (seen through gRPC on
        # chat prompts: 40 steps in, a first round fed 127 tokens in 1.1 s)
        first = first and catch_up <= CAUGHT_UP_PRICED
        with self._lock:
            arm = self.arms.get(exit)
            if arm is None or arm.rounds < self.min_samples or (standby and not self.off_known()):
                return exit, (0 if standby else planned)
            c = max(1, int(concurrency))
            off = self.off_rate(c)
            lengths = range(1, max(1, planned) + 1)
            arms = [e for e in self.exits if e == exit or self._trusted(e, than=exit)] if move else [exit]
            own = own or {}
            rate, g, best = max((self.rate(e, g, c, own.get(e), catch_up), -g, e) for e in arms for g in lengths)
            if not off or rate > off * (1 + self.min_gain):
                self.arms[best].refresh_steps = REFRESH_STEPS
                if -g < planned and self.arms[best].rounds % LENGTH_PROBE_EVERY == LENGTH_PROBE_EVERY - 1:
                    return best, -g + 1  # one position past the best, to keep its estimate current
                return best, -g
            def probe() -> int:  # a probe round's length, priced only where one runs
                return min(planned, max(REFRESH_LEN, max(lengths, key=lambda n: self.rate(exit, n, c, own.get(exit)))))

            if not self._may_probe(exit, c):
                if first and c <= PROBE_MAX_CONCURRENCY and self._could_pay(exit, c, acceptance=1.0):
                    # refused only for what recent requests reached: every PLAUSIBLE_REQUESTS-th
                    # such first round probes anyway, so that a change of traffic is seen
                    arm.unprobed += 1
                    if arm.unprobed >= PLAUSIBLE_REQUESTS:
                        arm.unprobed = 0
                        return exit, probe()
                return exit, 0  # no probe round at this load
            if c <= PROBE_MAX_CONCURRENCY and first:
                return exit, probe()  # the request's own first round: its own acceptance decides the rest
            interval = arm.refresh_steps or REFRESH_STEPS
            if self.ar_steps - arm.seen_at >= interval:
                arm.seen_at = self.ar_steps  # one refresh round per interval, whoever asks
                arm.refresh_steps = min(MAX_REFRESH_STEPS, 2 * interval)
                return exit, probe()
            return exit, 0

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "verify_s": {k: e.value for k, e in sorted(self.verify_s.items())},
                "block_costs": list(self.block_costs) if self.block_costs else None,
                "cost_curve": dict(self._points),
                "ar_steps": self.ar_steps,
                "arms": {
                    e: {
                        "rounds": a.rounds,
                        "draft_step_s": a.draft_step_s.value,
                        "feed_s": a.feed_s.value,
                        "plausible_acceptance": round(a.plausible_acceptance(), 3),
                        "acceptance": [round(x.value, 3) for x in a.accept if x.value is not None],
                    }
                    for e, a in self.arms.items()
                },
            }
