"""speculation.sorted_policy: S2D exit policy validation and the emit rule."""

from __future__ import annotations

import math

import pytest

from tandem.speculation.sorted_policy import ExitPolicy, should_emit


def test_single_exit_always_emits() -> None:
    policy = ExitPolicy.single(6)
    assert policy == ExitPolicy(exits=(6,), thresholds=())
    assert should_emit(policy, 0, 0.0)


def test_emit_rule_uses_threshold_inclusive_and_last_exit_always_emits() -> None:
    policy = ExitPolicy(exits=(2, 4, 8), thresholds=(0.9, 0.6))
    assert should_emit(policy, 0, 0.9)  # reaches the threshold exactly
    assert not should_emit(policy, 0, 0.89)
    assert should_emit(policy, 1, 0.75)
    assert not should_emit(policy, 1, 0.5)
    assert should_emit(policy, 2, 0.01)  # deepest exit
    assert not should_emit(policy, 0, math.nan)


def test_threshold_bounds_are_inclusive() -> None:
    policy = ExitPolicy(exits=(1, 2, 3), thresholds=(0.0, 1.0))
    assert should_emit(policy, 0, 0.0)  # threshold 0: always emits
    assert not should_emit(policy, 1, 0.999)  # threshold 1: only a certain exit emits
    assert should_emit(policy, 1, 1.0)


def test_lists_are_stored_as_tuples() -> None:
    policy = ExitPolicy(exits=[2, 4], thresholds=[0.5])  # type: ignore[arg-type]
    assert policy.exits == (2, 4) and policy.thresholds == (0.5,)
    assert hash(policy) == hash(ExitPolicy(exits=(2, 4), thresholds=(0.5,)))


@pytest.mark.parametrize(
    ("exits", "thresholds", "message"),
    [
        ((), (), "^exits must hold at least one depth"),
        ((0, 2), (0.5,), r"^exits\[0\] must be >= 1, got 0"),
        ((2, 2), (0.5,), r"^exits must be strictly increasing, got \(2, 2\)"),
        ((4, 2), (0.5,), "^exits must be strictly increasing"),
        ((2.5, 4), (0.5,), r"^exits\[0\] must be an integer"),
        ((True, 4), (0.5,), r"^exits\[0\] must be an integer"),
        ((2, 4, 6), (0.5,), r"^thresholds must have len\(exits\) - 1 = 2 entries, got 1"),
        ((2,), (0.5,), "^thresholds must have"),
        ((2, 4, 6), (0.5, 1.5), r"^thresholds\[1\] must be in \[0, 1\], got 1.5"),
        ((2, 4), (-0.1,), r"^thresholds\[0\] must be in \[0, 1\]"),
        ((2, 4), (math.nan,), r"^thresholds\[0\] must be in \[0, 1\]"),
        ((2, 4), ("0.5",), r"^thresholds\[0\] must be a real number"),
    ],
)
def test_policy_validation_names_the_field(exits: tuple, thresholds: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExitPolicy(exits=exits, thresholds=thresholds)


def test_should_emit_checks_the_index() -> None:
    with pytest.raises(ValueError, match="^exit_index must be in"):
        should_emit(ExitPolicy.single(3), 1, 0.5)
