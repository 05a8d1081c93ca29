"""Goodput policy: per target, pick the draft exit and the draft length (0 = speculation
off) that maximise expected committed tokens per second, from live acceptance and step
times (SmartSpec, Liu et al., arXiv 2406.14066).

Glossary
- arm: one draft exit (a depth of the shared sorted draft) for one target.
- acceptance by position: a_i = P(draft position i accepted | positions < i accepted), an
  exponential moving average per arm over observed rounds.
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
- rate = E(draft_len) / round time; speculation off has rate 1 / V_ar (one token per step).

Exploration: each arm is tried `min_samples` times before it is trusted, and every
`explore_every`-th choice tries the arm with the fewest samples, so a change in traffic or
load (which moves d and V) is noticed. Under heavy load measured step times grow (batched
verification, a busy draft pool), so the chosen draft length shrinks and speculation turns
itself off once it no longer pays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class _Ema:
    alpha: float
    value: float | None = None
    count: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
        self.count += 1


@dataclass
class ArmStats:
    """Live statistics of one exit for one target."""

    alpha: float
    accept: list[_Ema] = field(default_factory=list)  # per draft position
    draft_step_s: _Ema | None = None
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.draft_step_s is None:
            self.draft_step_s = _Ema(self.alpha)

    def observe(self, *, drafted: int, accepted: int, draft_s: float) -> None:
        self.rounds += 1
        while len(self.accept) < drafted:
            self.accept.append(_Ema(self.alpha))
        for i in range(min(accepted + 1, drafted)):
            self.accept[i].add(1.0 if i < accepted else 0.0)  # position i reached; accepted?
        if drafted > 0:
            self.draft_step_s.add(draft_s / drafted)

    def acceptance(self, draft_len: int, prior: float) -> list[float]:
        """a_1..a_draft_len; unseen positions repeat the last seen one (or the prior)."""
        seen = [e.value for e in self.accept if e.value is not None]
        last = seen[-1] if seen else prior
        return [(seen[i] if i < len(seen) else last) for i in range(draft_len)]


PRIOR_ACCEPTANCE = 0.8  # per-position acceptance assumed before any round of a request is seen


def round_rate(acceptance: Sequence[float], *, draft_step_s: float, verify_s: float, overlapped: bool) -> float:
    """Predicted tokens/s of rounds drafting len(acceptance) tokens: E / round time, the round
    sequential (draft_len d + V) or overlapped (max(draft_len d, V))."""
    draft_len = len(acceptance)
    t = max(draft_len * draft_step_s, verify_s) if overlapped else draft_len * draft_step_s + verify_s
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
        block_costs: Sequence[float] | None = None,
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
        self.arms = {e: ArmStats(alpha=alpha) for e in self.exits}
        if block_costs is not None and (not block_costs or any(not c > 0 for c in block_costs)):
            raise ValueError(f"block_costs must be positive forward times for blocks of 1, 2, ... rows, got {list(block_costs)}")
        self.block_costs = tuple(float(c) for c in block_costs) if block_costs else None
        self._alpha = alpha
        self.verify_s: dict[int, _Ema] = {}  # rows of the verified block -> its verification time
        self.ar_step_s = _Ema(alpha)  # one target-only step
        self._choices = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ observations
    def observe_round(self, *, exit: int | None, drafted: int, accepted: int, draft_s: float, verify_s: float) -> None:
        with self._lock:
            if drafted == 0:  # a target-only step
                self.ar_step_s.add(verify_s)
                return
            if exit not in self.arms:  # a round drafted elsewhere (unknown exit): it prices nothing here
                return
            self.verify_s.setdefault(drafted + 1, _Ema(self._alpha)).add(verify_s)
            self.arms[exit].observe(drafted=drafted, accepted=accepted, draft_s=draft_s)

    # ------------------------------------------------------------------ prediction
    def _relative_cost(self, rows: int, base: int) -> float:
        c = self.block_costs
        if c is None:
            return 1.0
        return c[min(rows, len(c)) - 1] / c[min(base, len(c)) - 1]

    def verify_time(self, rows: int) -> float | None:
        """Predicted verification time of a block of `rows` rows (None when nothing is known)."""
        seen = {k: e.value for k, e in self.verify_s.items() if e.value is not None}
        if self.ar_step_s.value is not None:
            seen.setdefault(1, self.ar_step_s.value)  # a target-only step is a block of one row
        if not seen:
            return None
        if rows in seen:
            return seen[rows]
        near = min(seen, key=lambda k: (abs(k - rows), k))
        return seen[near] * self._relative_cost(rows, near)

    def rate(self, exit: int, draft_len: int) -> float:
        """Predicted tokens/s of an arm with draft_len drafts (0.0 when nothing is known)."""
        arm = self.arms[exit]
        d = arm.draft_step_s.value
        v = self.verify_time(draft_len + 1)
        if d is None or v is None:
            return 0.0
        return round_rate(arm.acceptance(draft_len, self.prior), draft_step_s=d, verify_s=v, overlapped=self.overlapped)

    def best_draft_len(self, exit: int) -> tuple[int, float]:
        best = max(range(1, self.max_draft_len + 1), key=lambda g: self.rate(exit, g))
        return best, self.rate(exit, best)

    def off_rate(self) -> float:
        v = self.ar_step_s.value
        return 1.0 / v if v else 0.0

    # ------------------------------------------------------------------ decision
    def choose(self) -> Choice:
        with self._lock:
            self._choices += 1
            # 1. every arm gets min_samples rounds before it is trusted
            for e in reversed(self.exits):  # deepest first: most likely useful
                if self.arms[e].rounds < self.min_samples:
                    return Choice(exit=e, draft_len=min(4, self.max_draft_len), rate=0.0, exploring=True)
            if self.ar_step_s.count < 1:
                return Choice(exit=None, draft_len=0, rate=0.0, exploring=True)  # measure the off rate once
            # 2. exploitation, with periodic exploration
            scored = [(self.best_draft_len(e), e) for e in self.exits]
            (draft_len, rate), exit = max(scored, key=lambda item: item[0][1])
            if self.explore_every and self._choices % self.explore_every == 0:
                # the least observed option, speculation off included
                options = [(self.arms[e].rounds, e) for e in self.exits] + [(self.ar_step_s.count, -1)]
                _, least = min(options)
                if least == -1:
                    return Choice(exit=None, draft_len=0, rate=self.off_rate(), exploring=True)
                g, r = self.best_draft_len(least)
                return Choice(exit=least, draft_len=g, rate=r, exploring=True)
            if rate <= self.off_rate():
                return Choice(exit=None, draft_len=0, rate=self.off_rate())
            return Choice(exit=exit, draft_len=draft_len, rate=rate)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "verify_s": {k: e.value for k, e in sorted(self.verify_s.items())},
                "block_costs": list(self.block_costs) if self.block_costs else None,
                "ar_step_s": self.ar_step_s.value,
                "arms": {
                    e: {
                        "rounds": a.rounds,
                        "draft_step_s": a.draft_step_s.value,
                        "acceptance": [round(x.value, 3) for x in a.accept if x.value is not None],
                    }
                    for e, a in self.arms.items()
                },
            }
