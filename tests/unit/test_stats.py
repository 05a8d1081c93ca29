"""speculation.stats: SpecStats arithmetic."""

from __future__ import annotations

import json

import pytest

from tandem.speculation.stats import SpecStats


def test_empty_stats() -> None:
    stats = SpecStats()
    assert stats.mean_accepted_len == 0.0 and stats.acceptance_rate == 0.0
    assert stats.acceptance_by_position() == []


def test_record_rounds() -> None:
    stats = SpecStats()
    stats.record_round(drafted=4, accepted=4, emitted=5, exits=(2, 2, 4, 8))  # all accepted + bonus
    stats.record_round(drafted=4, accepted=1, emitted=2, exits=(2, 4, 4, 4))  # reject at position 1
    stats.record_round(drafted=2, accepted=0, emitted=1)  # short round, no exit info
    assert (stats.rounds, stats.drafted, stats.accepted, stats.emitted) == (3, 10, 5, 8)
    assert stats.drafted_by_position == [3, 3, 2, 2]
    assert stats.accepted_by_position == [2, 1, 1, 1]
    assert stats.acceptance_by_position() == pytest.approx([2 / 3, 1 / 3, 1 / 2, 1 / 2])
    assert stats.exits_used == {2: 3, 4: 4, 8: 1}
    assert stats.mean_accepted_len == pytest.approx(8 / 3)  # committed tokens per round
    assert stats.acceptance_rate == pytest.approx(0.5)


def test_merge_adds_and_leaves_the_other_alone() -> None:
    a, b = SpecStats(), SpecStats()
    a.record_round(drafted=2, accepted=2, emitted=3, exits=(4, 4))
    b.record_round(drafted=4, accepted=3, emitted=4, exits=(2, 4, 4, 8))
    b.record_round(drafted=3, accepted=0, emitted=1)
    b_before = b.to_dict()
    a.merge(b)
    assert b.to_dict() == b_before
    assert (a.rounds, a.drafted, a.accepted, a.emitted) == (3, 9, 5, 8)
    assert a.drafted_by_position == [3, 3, 2, 1]
    assert a.accepted_by_position == [2, 2, 1]
    assert a.acceptance_by_position() == pytest.approx([2 / 3, 2 / 3, 1 / 2, 0.0])
    assert a.exits_used == {2: 1, 4: 4, 8: 1}


def test_to_dict_is_json_round_trippable() -> None:
    stats = SpecStats()
    stats.record_round(drafted=3, accepted=2, emitted=3, exits=(2, 4, 4))
    d = stats.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "rounds": 1,
        "drafted": 3,
        "accepted": 2,
        "emitted": 3,
        "mean_accepted_len": 3.0,
        "acceptance_rate": pytest.approx(2 / 3),
        "acceptance_by_position": [1.0, 1.0, 0.0],
        "accepted_by_position": [1, 1],
        "drafted_by_position": [1, 1, 1],
        "exits_used": {"2": 1, "4": 2},
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drafted": -1, "accepted": 0, "emitted": 1}, "^drafted must be >= 0"),
        ({"drafted": 2, "accepted": 3, "emitted": 4}, r"^accepted must be <= drafted \(2\), got 3"),
        ({"drafted": 2, "accepted": 1, "emitted": -2}, "^emitted must be >= 0"),
    ],
)
def test_record_round_validates(kwargs: dict, message: str) -> None:
    stats = SpecStats()
    with pytest.raises(ValueError, match=message):
        stats.record_round(**kwargs)
    assert stats == SpecStats()  # nothing recorded
