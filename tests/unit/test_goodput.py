"""Goodput policy: expected tokens, rate model, and the choices it makes on synthetic
observations where the right answer is known in closed form."""

from __future__ import annotations

import pytest

from tandem.speculation.goodput import GoodputPolicy, expected_tokens


def test_expected_tokens_closed_form():
    assert expected_tokens([]) == 1.0
    assert expected_tokens([1.0, 1.0, 1.0]) == 4.0
    a = 0.8
    # geometric: 1 + a + a^2 + a^3
    assert expected_tokens([a, a, a]) == pytest.approx(1 + a + a**2 + a**3)
    assert expected_tokens([0.5, 0.0, 1.0]) == pytest.approx(1.5)


def feed(policy, *, exit, acceptance, draft_step, verify, rounds=40, gamma=8):
    """Deterministic rounds: position i accepted iff i < round(acceptance * gamma)."""
    accepted = round(acceptance * gamma)
    for _ in range(rounds):
        policy.observe_round(exit=exit, drafted=gamma, accepted=accepted, draft_s=draft_step * gamma, verify_s=verify)


def warm(policy, verify=0.2):
    for _ in range(3):
        policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=verify)


def test_explores_every_arm_first_then_exploits_the_best():
    p = GoodputPolicy(exits=(8, 16, 24), max_draft_len=8, overlapped=False, explore_every=0)
    first = [p.choose() for _ in range(1)]
    assert first[0].exit == 24 and first[0].exploring
    feed(p, exit=24, acceptance=0.875, draft_step=0.030, verify=0.2)
    feed(p, exit=16, acceptance=0.5, draft_step=0.020, verify=0.2)
    feed(p, exit=8, acceptance=0.25, draft_step=0.010, verify=0.2)
    warm(p)
    c = p.choose()
    assert c.exit == 24 and not c.exploring
    # the predicted rate matches the closed form for the chosen gamma
    rate_best = max(p.rate(24, g) for g in range(1, 9))
    assert c.rate == pytest.approx(rate_best)


def test_cheap_shallow_exit_wins_when_it_is_accepted_as_often():
    p = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=False, explore_every=0)
    feed(p, exit=24, acceptance=0.875, draft_step=0.050, verify=0.2)
    feed(p, exit=8, acceptance=0.875, draft_step=0.010, verify=0.2)
    warm(p)
    assert p.choose().exit == 8


def test_turns_off_when_speculation_does_not_pay():
    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=False, explore_every=0)
    # nothing is ever accepted and drafting costs as much as a target step
    feed(p, exit=24, acceptance=0.0, draft_step=0.2, verify=0.2)
    warm(p, verify=0.2)
    c = p.choose()
    assert c.exit is None and c.gamma == 0


def test_load_shortens_the_draft():
    """Slower draft steps (a busy draft pool) move the best gamma down."""
    light = GoodputPolicy(exits=(24,), max_draft_len=16, overlapped=False, explore_every=0)
    heavy = GoodputPolicy(exits=(24,), max_draft_len=16, overlapped=False, explore_every=0)
    for pol, step in ((light, 0.01), (heavy, 0.08)):
        for i in range(60):  # acceptance that decays with position
            accepted = [2, 5, 8, 12, 16][i % 5]
            pol.observe_round(exit=24, drafted=16, accepted=accepted, draft_s=step * 16, verify_s=0.2)
        warm(pol)
    assert heavy.choose().gamma < light.choose().gamma


def test_overlapped_rate_hides_draft_time():
    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=True, explore_every=0)
    feed(p, exit=24, acceptance=1.0, draft_step=0.025, verify=0.2)
    warm(p)
    # gamma 8 drafts in exactly one verification: 9 tokens per 0.2 s
    assert p.rate(24, 8) == pytest.approx(9 / 0.2)
    assert p.choose().gamma == 8


def test_periodic_exploration_revisits_the_least_seen_option():
    p = GoodputPolicy(exits=(8, 24), max_draft_len=4, overlapped=False, explore_every=2)
    feed(p, exit=24, acceptance=1.0, draft_step=0.01, verify=0.2, rounds=50)
    feed(p, exit=8, acceptance=0.0, draft_step=0.01, verify=0.2, rounds=3)
    warm(p)
    picks = []
    for _ in range(8):
        c = p.choose()
        picks.append(c)
        # the caller reports what it ran
        p.observe_round(exit=c.exit, drafted=c.gamma, accepted=0, draft_s=0.01 * c.gamma, verify_s=0.2)
    assert any(c.exploring and c.exit == 8 for c in picks)
    assert any(c.exploring and c.exit is None for c in picks)
    assert any(not c.exploring and c.exit == 24 for c in picks)


def test_bad_arguments():
    with pytest.raises(ValueError, match="exits"):
        GoodputPolicy(exits=(), max_draft_len=4)
    with pytest.raises(ValueError, match="max_draft_len"):
        GoodputPolicy(exits=(8,), max_draft_len=0)
