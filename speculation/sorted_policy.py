"""S2D sorted drafting: which exit of a multi-exit draft emits each draft token.

Glossary
--------
draft
    One small model with several exits: its first d layers, the shared final norm and the
    LM head give an exit at depth d. ``q`` for a draft token is the distribution of the exit
    that emitted it.
target
    The model whose distribution the verifier reproduces; thresholds are tuned per target
    (small targets prefer shallow exits, large targets deep ones).
exit
    A draft depth (layer count) where a next-token distribution can be read off.
round
    The draft proposes draft_len tokens, choosing an exit per token, then the target verifies.
accepted / recovered (residual) / bonus token
    As in :mod:`speculation.verify`: verification is unchanged, because q is exactly the
    distribution of the exit used, so the choice of exit never affects losslessness.

For each draft token the exits run in depth order and the first whose max probability
reaches its threshold emits; the last exit always emits. Tokens that exited early lack KV in
deeper layers; the draft computes those lazily the next time a deeper exit runs.

Paper: Kavehzadeh et al. 2024, "S2D: Sorted Speculative Decoding for More Efficient
Deployment of Nested Large Language Models", arXiv 2407.01955 (reference code:
github.com/parsareal/SD2). Verification: Leviathan et al. 2023, arXiv 2211.17192;
Chen et al. 2023, arXiv 2302.01318.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["ExitPolicy", "should_emit"]


@dataclass(frozen=True)
class ExitPolicy:
    """Where the exits sit and when each one may emit.

    exits: draft layer counts with an exit, strictly increasing, each >= 1; the last is the
        deepest exit used and always emits.
    thresholds: one per exit except the last (len(exits) - 1), each in [0, 1]; exit i emits
        when its max probability is >= thresholds[i].
    """

    exits: tuple[int, ...]
    thresholds: tuple[float, ...]

    def __post_init__(self) -> None:
        exits = tuple(self.exits)
        if len(exits) == 0:
            raise ValueError("exits must hold at least one depth")
        for i, depth in enumerate(exits):
            if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
                raise ValueError(f"exits[{i}] must be an integer, got {type(depth).__name__} {depth!r}")
            if depth < 1:
                raise ValueError(f"exits[{i}] must be >= 1, got {depth}")
        exits = tuple(int(depth) for depth in exits)
        if any(shallow >= deep for shallow, deep in zip(exits, exits[1:])):
            raise ValueError(f"exits must be strictly increasing, got {exits}")
        thresholds = tuple(self.thresholds)
        if len(thresholds) != len(exits) - 1:
            raise ValueError(f"thresholds must have len(exits) - 1 = {len(exits) - 1} entries, got {len(thresholds)}")
        for i, threshold in enumerate(thresholds):
            if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
                raise ValueError(f"thresholds[{i}] must be a real number, got {type(threshold).__name__} {threshold!r}")
            if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
                raise ValueError(f"thresholds[{i}] must be in [0, 1], got {threshold}")
        # Lists in, tuples stored: keeps the frozen policy hashable.
        object.__setattr__(self, "exits", exits)
        object.__setattr__(self, "thresholds", tuple(float(t) for t in thresholds))

    @classmethod
    def single(cls, depth: int) -> ExitPolicy:
        """One exit at ``depth`` that always emits (plain single-depth drafting)."""
        return cls(exits=(depth,), thresholds=())


def should_emit(policy: ExitPolicy, exit_index: int, max_prob: float) -> bool:
    """True if the exit at ``exit_index`` emits the token: it is the last exit, or its max
    probability reaches its threshold (>=). A NaN max_prob never passes a threshold."""
    if not 0 <= exit_index < len(policy.exits):
        raise ValueError(f"exit_index must be in [0, {len(policy.exits)}), got {exit_index}")
    if exit_index == len(policy.exits) - 1:
        return True  # the deepest exit always emits
    return max_prob >= policy.thresholds[exit_index]  # confident enough to stop early
