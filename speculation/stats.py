"""Acceptance statistics for speculative decoding.

Glossary
--------
draft / target
    The small proposing model and the large verifying model.
round
    One draft-then-verify cycle (one target forward pass over the block).
drafted
    Draft tokens proposed in a round (draft_len, or fewer near the token limit).
accepted
    Draft tokens the verifier kept.
recovered / residual, bonus token
    The one extra token each round commits: sampled from the residual after a rejection,
    or the bonus sampled from the target after full acceptance.
emitted
    Tokens committed in a round: accepted + the recovered or bonus token (fewer only when
    the request stops early, e.g. at its token limit).
exit
    For S2D sorted drafts, the draft depth that emitted a draft token.

Acceptance is a first-class number: ``mean_accepted_len`` is the figure papers and SGLang
(``avg_spec_accept_length``) report. Expected value for i.i.d. acceptance rate a and draft
length draft_len: (1 - a^(draft_len+1)) / (1 - a) (Leviathan et al. 2023, arXiv 2211.17192; Chen et
al. 2023, arXiv 2302.01318; S2D exits: Kavehzadeh et al., arXiv 2407.01955).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["SpecStats"]


def _add_positionwise(total: list[int], extra: Sequence[int]) -> list[int]:
    """Elementwise sum of two count lists of possibly different lengths."""
    longer, shorter = (list(total), extra) if len(total) >= len(extra) else (list(extra), total)
    for i, count in enumerate(shorter):
        longer[i] += count
    return longer


@dataclass
class SpecStats:
    """Running counters for one request, one target, or a whole service (see ``merge``).

    Mutable on purpose: it is an accumulator owned by one caller.
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens committed (accepted + recovered/bonus)
    # [i] = rounds where draft position i was accepted
    accepted_by_position: list[int] = field(default_factory=list)
    # [i] = rounds where a draft token existed at position i
    drafted_by_position: list[int] = field(default_factory=list)
    exits_used: dict[int, int] = field(default_factory=dict)  # exit depth -> draft tokens that exit emitted

    def record_round(self, *, drafted: int, accepted: int, emitted: int, exits: Sequence[int] = ()) -> None:
        """Add one round: ``drafted`` tokens proposed, the first ``accepted`` kept,
        ``emitted`` committed; ``exits`` lists the exit depth of each draft token (S2D)."""
        for name, value in (("drafted", drafted), ("accepted", accepted), ("emitted", emitted)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if accepted > drafted:
            raise ValueError(f"accepted must be <= drafted ({drafted}), got {accepted}")
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted
        # Accepted tokens are a prefix of the drafted ones, so positions 0..accepted-1 count.
        self.drafted_by_position = _add_positionwise(self.drafted_by_position, [1] * drafted)
        self.accepted_by_position = _add_positionwise(self.accepted_by_position, [1] * accepted)
        for depth in exits:
            self.exits_used[int(depth)] = self.exits_used.get(int(depth), 0) + 1

    def merge(self, other: SpecStats) -> None:
        """Add ``other``'s counters into this one (``other`` is left unchanged)."""
        self.rounds += other.rounds
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.drafted_by_position = _add_positionwise(self.drafted_by_position, other.drafted_by_position)
        self.accepted_by_position = _add_positionwise(self.accepted_by_position, other.accepted_by_position)
        for depth, count in other.exits_used.items():
            self.exits_used[depth] = self.exits_used.get(depth, 0) + count

    @property
    def mean_accepted_len(self) -> float:
        """Tokens committed per round, emitted / rounds: accepted draft tokens plus the one
        recovered or bonus token (so 1.0 means no draft token was ever accepted); 0.0 with
        no rounds. Same definition as SGLang's avg_spec_accept_length."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted; 0.0 with nothing drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def acceptance_by_position(self) -> list[float]:
        """[i] = fraction of rounds with a draft token at position i in which it was accepted."""
        accepted = self.accepted_by_position + [0] * (len(self.drafted_by_position) - len(self.accepted_by_position))
        return [a / d if d else 0.0 for a, d in zip(accepted, self.drafted_by_position)]

    def to_dict(self) -> dict:
        """JSON-able snapshot, derived numbers included. ``exits_used`` keys become strings
        (JSON object keys are strings), so ``json.loads(json.dumps(d)) == d``."""
        return {
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "emitted": self.emitted,
            "mean_accepted_len": self.mean_accepted_len,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_by_position": self.acceptance_by_position(),
            "accepted_by_position": list(self.accepted_by_position),
            "drafted_by_position": list(self.drafted_by_position),
            "exits_used": {str(depth): count for depth, count in sorted(self.exits_used.items())},
        }
