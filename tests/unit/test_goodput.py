"""Goodput policy: expected tokens, rate model, and the choices it makes on synthetic
observations where the right answer is known in closed form."""

from __future__ import annotations

import pytest

from tandem.speculation.goodput import Choice, GoodputPolicy, expected_tokens


def test_expected_tokens_closed_form():
    assert expected_tokens([]) == 1.0
    assert expected_tokens([1.0, 1.0, 1.0]) == 4.0
    a = 0.8
    # geometric: 1 + a + a^2 + a^3
    assert expected_tokens([a, a, a]) == pytest.approx(1 + a + a**2 + a**3)
    assert expected_tokens([0.5, 0.0, 1.0]) == pytest.approx(1.5)


def feed(policy, *, exit, acceptance, draft_step, verify, rounds=40, draft_len=8):
    """Deterministic rounds: position i accepted iff i < round(acceptance * draft_len)."""
    accepted = round(acceptance * draft_len)
    for _ in range(rounds):
        policy.observe_round(exit=exit, drafted=draft_len, accepted=accepted, draft_s=draft_step * draft_len, verify_s=verify)


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
    # the predicted rate matches the closed form for the chosen draft_len
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
    assert c.exit is None and c.draft_len == 0


def test_load_shortens_the_draft():
    """Slower draft steps (a busy draft pool) move the best draft_len down."""
    light = GoodputPolicy(exits=(24,), max_draft_len=16, overlapped=False, explore_every=0)
    heavy = GoodputPolicy(exits=(24,), max_draft_len=16, overlapped=False, explore_every=0)
    for pol, step in ((light, 0.01), (heavy, 0.08)):
        for i in range(60):  # acceptance that decays with position
            accepted = [2, 5, 8, 12, 16][i % 5]
            pol.observe_round(exit=24, drafted=16, accepted=accepted, draft_s=step * 16, verify_s=0.2)
        warm(pol)
    assert heavy.choose().draft_len < light.choose().draft_len


def test_overlapped_rate_hides_draft_time():
    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=True, explore_every=0)
    feed(p, exit=24, acceptance=1.0, draft_step=0.025, verify=0.2)
    warm(p)
    # draft_len 8 drafts in exactly one verification: 9 tokens per 0.2 s
    assert p.rate(24, 8) == pytest.approx(9 / 0.2)
    assert p.choose().draft_len == 8


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
        p.observe_round(exit=c.exit, drafted=c.draft_len, accepted=0, draft_s=0.01 * c.draft_len, verify_s=0.2)
    assert any(c.exploring and c.exit == 8 for c in picks)
    assert any(c.exploring and c.exit is None for c in picks)
    assert any(not c.exploring and c.exit == 24 for c in picks)


def test_an_arm_that_turned_off_is_measured_again():
    """A run of bad rounds on the best arm (acceptance 0 for a while) turns speculation off;
    while off, periodic exploration re-measures that arm (every other exploration), so the
    target drafts again once its rounds are good again. The least seen arm (8) is explored
    too. Without the re-measure the deep arm, the most seen, would never be picked again."""
    p = GoodputPolicy(exits=(8, 24), max_draft_len=4, overlapped=False, explore_every=4)
    feed(p, exit=8, acceptance=0.0, draft_step=0.01, verify=0.2, rounds=3)
    feed(p, exit=24, acceptance=1.0, draft_step=0.01, verify=0.2, rounds=50)
    feed(p, exit=24, acceptance=0.0, draft_step=0.01, verify=0.2, rounds=20, draft_len=4)  # a hard stretch
    warm(p)
    assert p.choose().exit is None  # off now
    picks = []
    for _ in range(16):
        c = p.choose()
        picks.append(c)
        good = c.exit == 24  # the text is easy again: the deep arm's drafts are all accepted
        p.observe_round(exit=c.exit, drafted=c.draft_len, accepted=c.draft_len if good else 0,
                        draft_s=0.01 * c.draft_len, verify_s=0.2)
    retests = [i for i, c in enumerate(picks) if c.exploring and c.exit == 24]
    assert retests, [(c.exit, c.exploring) for c in picks]
    assert any(c.exploring and c.exit == 8 for c in picks)
    # after the re-measure the policy exploits the deep arm again
    assert any(not c.exploring and c.exit == 24 for c in picks[retests[0] + 1:])


def test_bad_arguments():
    with pytest.raises(ValueError, match="exits"):
        GoodputPolicy(exits=(), max_draft_len=4)
    with pytest.raises(ValueError, match="max_draft_len"):
        GoodputPolicy(exits=(8,), max_draft_len=0)


# A 4-bit CPU target's verification cost per block size (ms, k = 1..9 rows): the int4 kernel
# works in tiles of 4 rows, so 5-8 rows cost about twice 1-4 (bench/results/pack_fidelity.json).
TILED = [35, 40, 45, 49, 100, 105, 110, 115, 160]


def fed_at_draft_len_3(block_costs):
    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=False, explore_every=0, block_costs=block_costs)
    feed(p, exit=24, acceptance=1.0, draft_step=0.010, verify=0.049, draft_len=3)  # blocks of 4 rows seen
    warm(p, verify=0.035)
    return p


def test_draft_length_follows_the_targets_cost_curve():
    flat, tiled = fed_at_draft_len_3(None), fed_at_draft_len_3(TILED)
    # every draft accepted: E(g) = g + 1, so rate(g) = (g + 1) / (g d + V(g + 1)) in closed form
    assert flat.rate(24, 8) == pytest.approx(9 / (0.08 + 0.049))  # unseen 9 rows: as the nearest seen (4)
    assert tiled.rate(24, 8) == pytest.approx(9 / (0.08 + 0.049 * 160 / 49))  # scaled by the curve
    assert tiled.rate(24, 3) == pytest.approx(4 / (0.03 + 0.049))  # seen: as measured
    assert tiled.verify_time(1) == pytest.approx(0.035)  # a target-only step is a block of one row
    assert flat.choose().draft_len == 8  # negative control: without the curve, longer always looks cheap
    assert tiled.choose().draft_len == 3  # with it, the block stays within one 4-row tile


def test_live_verification_times_override_the_curve():
    p = fed_at_draft_len_3(TILED)
    feed(p, exit=24, acceptance=1.0, draft_step=0.010, verify=0.060, draft_len=8)  # 9 rows measured cheap
    assert p.verify_time(9) == pytest.approx(0.060)
    assert p.verify_time(8) == pytest.approx(0.060 * 115 / 160)  # the nearest seen (9 rows), scaled
    assert p.choose().draft_len > 4  # a long draft measured cheap is chosen despite the prior
    assert p.snapshot()["verify_s"] == {1: pytest.approx(0.035), 4: pytest.approx(0.049), 9: pytest.approx(0.060)}


def test_block_costs_must_be_positive():
    for bad in ([], [1.0, 0.0], [float("nan")]):
        with pytest.raises(ValueError, match="block_costs must be positive"):
            GoodputPolicy(exits=(24,), max_draft_len=4, block_costs=bad)


def test_planned_draft_len_per_target():
    from tandem.speculation.goodput import planned_draft_len, round_rate

    flat = [0.107, 0.107, 0.108, 0.110, 0.120, 0.125, 0.130, 0.135, 0.138]  # bf16 1.5B (pack_fidelity.json)
    tiled = [t / 1000 for t in TILED]  # the same model at 4 bits
    draft = 0.013  # the 0.5B int4 draft's step
    g_flat = planned_draft_len(flat, draft, max_draft_len=8, acceptance=0.9)
    g_tiled = planned_draft_len(tiled, draft, max_draft_len=8, acceptance=0.9)
    assert (g_flat, g_tiled) == (8, 3)  # the same draft and acceptance, a different target
    rates = [round_rate([0.9] * g, draft_step_s=draft, verify_s=tiled[g], overlapped=False) for g in range(1, 9)]
    assert g_tiled == 1 + rates.index(max(rates))
    assert planned_draft_len(flat, draft, max_draft_len=2, acceptance=0.8) == 2  # the bound holds
    with pytest.raises(ValueError, match="at least 2 rows"):
        planned_draft_len([0.1], draft, max_draft_len=4)


def test_pearl_window_follows_the_cost_curve():
    from tandem.actors.local import MAX_WINDOW, pearl_window

    tiles = [1 + k // 4 for k in range(MAX_WINDOW + 1)]  # rows 1-4: 1, 5-8: 2, ...
    flat = [1.0] * (MAX_WINDOW + 1)
    # the 1.5B pack at one thread: a 9-row probe of 0.3 s, a 0.5B draft step of 0.03 s
    w_flat, _ = pearl_window(flat, probe_rows=9, probe_s=0.3, draft_step_s=0.03)
    w_tiles, r_tiles = pearl_window(tiles, probe_rows=9, probe_s=0.3, draft_step_s=0.03)
    assert w_flat == 10  # negative control: a flat curve drafts for as long as the probe takes
    assert (w_tiles + 1) % 4 == 0  # a tiled one stops at a tile's end
    assert r_tiles == pytest.approx(max(
        expected_tokens([0.8] * w) / max(w * 0.03, 0.3 * tiles[w] / tiles[8]) for w in range(2, MAX_WINDOW + 1)
    ))


# Concurrency (issue 12): c requests share each target forward. A 4-bit CPU target's forward
# time grows with its rows (here: the tiled curve, then about 1.8 ms per row for batches, as
# the 1.5B pack measures), a GPU's hardly moves; acceptance and draft step are the same for both.
LINEAR_BATCH = {18: 0.30, 36: 0.62, 72: 1.25}
GPU_BLOCK = [0.020, 0.020, 0.020, 0.020, 0.021, 0.021, 0.021, 0.021, 0.021]
GPU_BATCH = {18: 0.022, 36: 0.023, 72: 0.026}


def live(block_costs, batch_costs, *, verify, ar):
    """A PEARL policy after rounds at one request: 8-token drafts, 7 of 8 accepted, 10 ms per
    draft token; target-only steps of `ar` s."""
    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=True, explore_every=0,
                      block_costs=block_costs, batch_costs=batch_costs)
    feed(p, exit=24, acceptance=0.875, draft_step=0.010, verify=verify, draft_len=8)
    warm(p, verify=ar)
    return p


def test_concurrency_prices_the_rows_of_every_running_request():
    cpu = live([t / 1000 for t in TILED], LINEAR_BATCH, verify=0.160, ar=0.035)
    gpu = live(GPU_BLOCK, GPU_BATCH, verify=0.021, ar=0.020)
    # alone, speculation pays on both
    assert cpu.choose(1).exit == 24 and gpu.choose(1).exit == 24
    # 8 running: the CPU target's forward of 8 blocks costs ~8x one block, so off (8 rows a
    # step) beats drafting (8 (g + 1) rows); in closed form, with the curve scaled to what
    # was seen at the nearest size:
    off8 = 1 / (0.035 * cpu.curve(8) / cpu.curve(1))
    assert cpu.off_rate(8) == pytest.approx(off8)
    e = 8  # 7 of 8 drafts accepted in every round, plus the target's token
    assert cpu.rate(24, 8, 8) == pytest.approx(e / max(0.08, 0.160 * cpu.curve(72) / cpu.curve(9)))
    assert cpu.choose(8).exit is None
    # the control: a GPU's forward of 72 rows costs about what one of 9 does; drafting still pays
    c = gpu.choose(8)
    assert c.exit == 24 and c.rate > gpu.off_rate(8)
    # and the same CPU target priced without concurrency (the old model) keeps speculating
    assert cpu.choose(1).exit == 24


def test_target_steps_are_priced_by_the_rows_of_the_forward_they_ran_in():
    """A target-only step batched beside three other requests' 9-row blocks ran in a forward
    of 4 x 9 rows: it is learned at 36 rows, not as the cost of one."""
    def policy():
        p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=True, explore_every=0,
                          block_costs=[t / 1000 for t in TILED], batch_costs=LINEAR_BATCH)
        feed(p, exit=24, acceptance=0.875, draft_step=0.010, verify=0.160, draft_len=8)
        return p

    told, untold = policy(), policy()
    for _ in range(3):
        told.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.62, step_rows=36)
        untold.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.62)
    assert 36 in told.verify_s and 1 not in told.verify_s
    assert told.off_rate(1) == pytest.approx(1 / (0.62 * told.curve(1) / told.curve(36)))  # ~36 ms a step alone
    assert told.choose(4).exit is None  # 4 running: off (4 rows) beats 4 PEARL blocks (40 rows)
    # negative control: recorded as a step of one row, off looks 18x slower than it is, alone
    # and at 4 running
    assert untold.off_rate(1) == pytest.approx(1 / 0.62)
    assert untold.off_rate(4) < told.off_rate(4) / 10


def test_cost_curve_interpolates_and_extends_along_its_mean_slope():
    p = GoodputPolicy(exits=(24,), max_draft_len=2, block_costs=[0.1, 0.2, 0.3], batch_costs={6: 0.6})
    assert p.curve(1) == pytest.approx(0.1) and p.curve(0) == pytest.approx(0.1)
    assert p.curve(3) == pytest.approx(0.3) and p.curve(5) == pytest.approx(0.5)
    assert p.curve(11) == pytest.approx(1.1)  # mean slope 0.1 s per row from (1, 0.1) to (6, 0.6)
    flat = GoodputPolicy(exits=(24,), max_draft_len=2, block_costs=[0.2, 0.2])
    assert flat.curve(100) == pytest.approx(0.2)
    assert GoodputPolicy(exits=(24,), max_draft_len=2).curve(5) is None
    with pytest.raises(ValueError, match="batch_costs"):
        GoodputPolicy(exits=(24,), max_draft_len=2, batch_costs={0: 0.1})


def test_a_cost_point_above_a_later_one_is_capped_by_it():
    """The curve `tandem serve` measured at one start-up (ms per block of 1..9 rows, then per
    batch): 3 rows read 229 ms between 77 for 2 and 96 for 4, and 36 rows 511. A forward of
    fewer rows never costs more than one of more, so 3 rows prices at 96 ms and the best
    draft length is not pushed off 2 drafts by the outlier. Control: a rising curve with the
    4-bit tile's jump (1.5B pack: 35/40/49/115 ms for 1/2/4/8 rows) is kept as measured."""
    noisy = [0.066, 0.077, 0.229, 0.096, 0.100, 0.106, 0.118, 0.123, 0.123]
    p = GoodputPolicy(exits=(24,), max_draft_len=8, block_costs=noisy, batch_costs={18: 0.166, 36: 0.511, 72: 0.738})
    assert p.curve(2) == pytest.approx(0.077) and p.curve(3) == pytest.approx(0.096) and p.curve(4) == pytest.approx(0.096)
    assert p.curve(36) == pytest.approx(0.511) and p.curve(72) == pytest.approx(0.738)
    assert p.block_costs == tuple(noisy)  # as measured, for the snapshot
    tiles = GoodputPolicy(exits=(24,), max_draft_len=8, block_costs=[0.035, 0.040, 0.045, 0.049, 0.090, 0.100, 0.108, 0.115])
    assert [tiles.curve(k) for k in range(1, 9)] == pytest.approx([0.035, 0.040, 0.045, 0.049, 0.090, 0.100, 0.108, 0.115])
    # priced on the live step alone (1 row, 66 ms), a 2-draft round at 90% is not a 229 ms verification
    p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.066)
    p.observe_round(exit=24, drafted=1, accepted=1, draft_s=0.02, verify_s=0.077)
    assert p.verify_time(3) == pytest.approx(0.096)


def test_a_burst_of_requests_tries_each_option_once_and_waits_on_the_rest():
    """8 requests planned at once, before any round is seen (a batch job's start): one tries
    each exit, one measures off, the rest run off (the safe default) instead of all trying
    the deepest exit (what happened before: 24 of 24 batch turns explored)."""
    p = GoodputPolicy(exits=(8, 12, 16, 24), max_draft_len=8, overlapped=True, explore_every=0)
    burst = [p.choose(8) for _ in range(8)]
    assert [c.exit for c in burst] == [24, 16, 12, 8, None, None, None, None]
    assert [c.exploring for c in burst] == [True] * 5 + [False] * 3
    assert all(c.draft_len == 4 for c in burst[:4]) and all(c.draft_len == 0 for c in burst[4:])
    # once the trials report, the choice is priced: only the deepest exit is ever accepted
    feed(p, exit=24, acceptance=0.875, draft_step=0.010, verify=0.021, draft_len=8)
    for e in (8, 12, 16):
        feed(p, exit=e, acceptance=0.0, draft_step=0.008, verify=0.021, draft_len=8)
    warm(p, verify=0.020)
    c = p.choose(1)
    assert c.exit == 24 and not c.exploring


def test_requests_planned_off_in_a_burst_draft_once_the_trials_show_it_pays():
    """The burst's waiting requests (planned off before anything was measured) are on standby
    for the deepest exit: their rounds are target-only steps while that arm is untried, and
    draft once its trial and off's steps show drafting pays. Before, they ran off for life
    (a fresh batch on code: 10 of 16 requests off, auto 0.94-0.96x off; warm, 1.34x). Controls:
    an arm's own trial keeps its plan while untried (standby=False); off's trial and an
    exploration of off are not on standby (they measure off)."""
    p = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=True, explore_every=0)
    burst = [p.choose(8) for _ in range(5)]
    assert [c.exit for c in burst] == [24, 8, None, None, None]
    assert burst[2].exploring and burst[2].standby is None  # off's trial measures off
    assert [c.standby for c in burst[3:]] == [24, 24]  # the rest wait on the deepest exit
    assert p.round_choice(24, planned=8, concurrency=1, standby=True)[1] == 0  # untried: off
    assert p.round_choice(24, planned=8, concurrency=1)[1] == 8  # control: a trial's plan stands
    feed(p, exit=24, acceptance=0.875, draft_step=0.010, verify=0.021, draft_len=8)
    feed(p, exit=8, acceptance=0.0, draft_step=0.008, verify=0.021, draft_len=8)
    assert p.round_choice(24, planned=8, concurrency=1, standby=True)[1] == 0  # off not measured yet
    warm(p, verify=0.020)
    assert p.round_choice(24, planned=8, concurrency=1, standby=True)[1] == p.best_draft_len(24, 1)[0] > 0
    # measured off (a slow draft, little accepted): still on standby, for the best arm
    slow = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=True, explore_every=0, min_samples=1)
    feed(slow, exit=24, acceptance=0.125, draft_step=0.050, verify=0.050, draft_len=8)
    feed(slow, exit=8, acceptance=0.0, draft_step=0.050, verify=0.050, draft_len=8)
    warm(slow, verify=0.020)
    c = slow.choose(1)
    assert c.exit is None and not c.exploring and c.standby == 24
    assert slow.round_choice(24, planned=8, concurrency=1, standby=True)[1] == 0


def test_a_trial_that_ended_with_too_few_rounds_goes_to_the_next_request():
    """A request handed an arm's trial that ends before min_samples rounds (a short request)
    gives the trial back (end_trial): the next request tries the arm. Before, the arm stayed
    untried for good (seen through gRPC: an 8-token first request held the full draft's trial
    for 2 rounds, and auto drafted from shallower exits only, at 0.65x of sd). Controls:
    without end_trial the arm is not tried again; a trial that saw min_samples rounds is not
    handed out again."""
    p = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=True, explore_every=0)
    assert (p.choose().exit, p.choose().exit) == (24, 8)  # the trials: deepest first
    feed(p, exit=24, acceptance=1.0, draft_step=0.010, verify=0.060, rounds=p.min_samples - 1, draft_len=4)
    feed(p, exit=8, acceptance=0.25, draft_step=0.004, verify=0.060, rounds=p.min_samples, draft_len=4)
    held = p.choose()
    assert held.exit is None and held.exploring  # control: off's trial; the full draft's stays held
    p.end_trial(24)
    again = p.choose()
    assert again.exit == 24 and again.exploring  # the full draft's trial, given back, goes on
    feed(p, exit=24, acceptance=1.0, draft_step=0.010, verify=0.060, rounds=1, draft_len=4)
    p.end_trial(24)  # it has min_samples rounds now: its trial is over
    warm(p, verify=0.060)
    assert not p.choose().exploring


def test_with_a_cost_curve_off_needs_no_trial_of_its_own():
    """A policy with the target's measured cost curve prices off from any forward it has seen,
    scaled along the curve (off_known): no request is handed off's trial, which ran a whole
    request off (seen through gRPC: the 5th request after start at 13.9 tok/s where the others
    drafted at 18-20). Control: without a curve, off's trial follows the exits'."""
    curve = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=True, explore_every=0,
                          block_costs=[0.060, 0.070, 0.080, 0.090, 0.100])
    bare = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=True, explore_every=0)
    for p in (curve, bare):
        assert [p.choose().exit for _ in range(2)] == [24, 8]  # the exits' trials
        feed(p, exit=24, acceptance=1.0, draft_step=0.010, verify=0.090, draft_len=4)
        feed(p, exit=8, acceptance=0.25, draft_step=0.004, verify=0.090, draft_len=4)
    assert curve.ar_steps == 0 and curve.off_rate() == pytest.approx(1 / (0.090 * 0.060 / 0.100))  # 5 rows -> 1
    c = curve.choose()
    assert c.exit == 24 and not c.exploring
    assert bare.off_rate() == 0.0
    b = bare.choose()
    assert b.exit is None and b.exploring  # control: off's own trial, a whole request off


@pytest.mark.parametrize("verify, off_wins", [(0.190, True), (0.170, False)])
def test_speculation_must_be_predicted_clearly_faster_than_off(verify, off_wins):
    """MIN_GAIN: predicted 1.05x off runs off; 1.18x drafts. Every draft accepted at
    draft_len 1 (the bound): 2 tokens per round of max(d, V(2)) against 1 per V(1) = 0.1 s."""
    def policy(min_gain=None):
        kw = {} if min_gain is None else {"min_gain": min_gain}
        p = GoodputPolicy(exits=(24,), max_draft_len=1, overlapped=True, explore_every=0, **kw)
        feed(p, exit=24, acceptance=1.0, draft_step=0.010, verify=verify, draft_len=1)
        warm(p, verify=0.100)
        return p

    p = policy()
    assert p.rate(24, 1) == pytest.approx(2 / verify)
    assert (p.choose().exit is None) is off_wins
    assert policy(min_gain=0.0).choose().exit == 24  # the control: without the margin both draft


def test_a_round_is_replanned_at_the_load_it_runs_at():
    """round_choice: a request planned alone onto an exit drafts while it runs alone,
    steps target-only (0) while 8 share the CPU target's forwards, and drafts again when
    they leave; a GPU-like curve keeps drafting at 8 (the control)."""
    cpu = live([t / 1000 for t in TILED], LINEAR_BATCH, verify=0.160, ar=0.035)
    gpu = live(GPU_BLOCK, GPU_BATCH, verify=0.021, ar=0.020)
    alone, _ = cpu.best_draft_len(24, 1)
    assert cpu.round_choice(24, planned=8, concurrency=1)[1] == alone > 0
    assert cpu.round_choice(24, planned=8, concurrency=8)[1] == 0  # as choose(8) would decide
    assert cpu.choose(8).exit is None
    assert cpu.round_choice(24, planned=8, concurrency=1)[1] == alone
    assert gpu.round_choice(24, planned=8, concurrency=8)[1] > 0
    # never past the planned length (the request's KV was sized for it)
    assert 1 <= cpu.round_choice(24, planned=2, concurrency=1)[1] <= 2
    # the plan stands while the arm is not known yet (its trial)
    fresh = GoodputPolicy(exits=(24,), max_draft_len=8, block_costs=[t / 1000 for t in TILED], batch_costs=LINEAR_BATCH)
    assert fresh.round_choice(24, planned=4, concurrency=8)[1] == 4
    feed(fresh, exit=24, acceptance=0.875, draft_step=0.010, verify=0.160, draft_len=8)
    # no target-only step seen yet: off is priced along the cost curve, and wins at 8
    assert fresh.ar_steps == 0 and fresh.round_choice(24, planned=4, concurrency=8)[1] == 0
    warm(fresh, verify=0.035)
    assert fresh.round_choice(24, planned=4, concurrency=8)[1] == 0
    # control: without a curve, off unseen is not weighed: the arm's best length up to the plan
    bare = GoodputPolicy(exits=(24,), max_draft_len=8)
    feed(bare, exit=24, acceptance=0.875, draft_step=0.010, verify=0.160, draft_len=8)
    assert bare.round_choice(24, planned=4, concurrency=8) == (24, max(range(1, 5), key=lambda g: bare.rate(24, g, 8)))


def test_a_round_moves_a_request_from_an_explored_arm_to_the_best_one():
    """round_choice(move=True) prices every tried arm, not only the request's own: a request
    whose trial (or exploration) of a shallow exit ended drafts its later rounds from the
    best one. Before, its own arm was the only option, so it went target-only (draft length
    0) for the rest of its tokens, which is what it still does without `move` (the control;
    a request moves once). Controls: where its own arm is the best it stays; where no arm
    pays, 0."""
    p = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=False, explore_every=0)
    feed(p, exit=24, acceptance=0.875, draft_step=0.010, verify=0.060)
    feed(p, exit=8, acceptance=0.0, draft_step=0.004, verify=0.040)
    warm(p, verify=0.040)
    exit, n = p.round_choice(8, planned=8, move=True)
    assert exit == 24 and n == p.best_draft_len(24)[0] > 0
    assert p.round_choice(8, planned=8) == (8, 0)  # not moving: its own arm steps target-only
    assert p.rate(8, 1) < p.off_rate() < p.rate(24, n)
    assert p.round_choice(24, planned=8, move=True) == (24, n)  # control: the best arm keeps it
    assert p.round_choice(8, planned=2, move=True)[1] <= 2  # never past its plan (its KV)
    none = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=False, explore_every=0)
    feed(none, exit=24, acceptance=0.0, draft_step=0.050, verify=0.060)
    feed(none, exit=8, acceptance=0.0, draft_step=0.040, verify=0.060)
    warm(none, verify=0.040)
    assert none.round_choice(8, planned=8, move=True) == (8, 0)  # control: nothing pays, a target-only step


def test_one_rejection_at_a_position_first_reached_does_not_zero_it():
    """A position reached for the first time starts from what was predicted of it (the last
    seen position's acceptance), so a single rejection there is one EMA step, not 0.0 for
    it and every position past it (which capped the draft length below where drafts kept
    being accepted). Control: rejections that keep coming still drive it down."""
    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=False, explore_every=0, alpha=0.2)
    feed(p, exit=24, acceptance=1.0, draft_step=0.010, verify=0.050, draft_len=6)
    warm(p, verify=0.040)
    p.observe_round(exit=24, drafted=8, accepted=6, draft_s=0.080, verify_s=0.050)
    a = p.arms[24].acceptance(8, p.prior)
    assert a[:6] == [1.0] * 6 and a[6] == pytest.approx(0.8) and a[7] == 1.0
    assert p.best_draft_len(24)[0] == 8  # verification is flat here: drafts 95% accepted are worth it
    for _ in range(10):
        p.observe_round(exit=24, drafted=8, accepted=6, draft_s=0.080, verify_s=0.050)
    assert p.arms[24].acceptance(8, p.prior)[6] < 0.1


def test_a_round_that_caught_the_draft_up_does_not_price_its_step():
    """A draft call that first fed tokens the draft missed (target-only steps before it) is
    mostly that catch-up; its time per draft token is not the draft's step. It still
    teaches acceptance. Control: an ordinary round (1-2 tokens fed) is priced."""
    from tandem.speculation.goodput import CAUGHT_UP_PRICED

    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=False, explore_every=0)
    feed(p, exit=24, acceptance=1.0, draft_step=0.025, verify=0.1, draft_len=4)
    before = p.arms[24].draft_step_s.value
    p.observe_round(exit=24, drafted=2, accepted=1, draft_s=0.2, verify_s=0.1, caught_up=65)
    assert p.arms[24].draft_step_s.value == before and p.arms[24].rounds == 41
    assert p.arms[24].accept[1].value < 1.0  # its rejection counted
    p.observe_round(exit=24, drafted=2, accepted=2, draft_s=0.2, verify_s=0.1, caught_up=CAUGHT_UP_PRICED)
    assert p.arms[24].draft_step_s.value > before  # control: priced


def test_an_arm_off_for_a_while_drafts_one_round_to_refresh_it():
    """Where off wins, the arm is re-measured by one drafting round every REFRESH_STEPS
    target-only steps (whichever request asks first), so a short bad stretch does not keep
    a target off for good; while off keeps winning the interval doubles. Controls: the next
    ask steps off again; before the steps pass, off."""
    from tandem.speculation.goodput import REFRESH_STEPS

    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=False, explore_every=0)
    # 1 token per 0.11 s at best, off 1 per 0.1; all accepted, 8 drafts would pay (9 per 0.18 s)
    feed(p, exit=24, acceptance=0.0, draft_step=0.01, verify=0.1)
    warm(p, verify=0.1)
    assert p.round_choice(24, planned=8, standby=True) == (24, 0)
    for _ in range(REFRESH_STEPS - 4):
        p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.1)
    assert p.round_choice(24, planned=8, standby=True) == (24, 0)  # not yet
    p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.1)
    exit, n = p.round_choice(24, planned=8, standby=True)
    assert exit == 24 and n >= 4  # one refresh round, long enough to see past position 1
    assert p.round_choice(24, planned=8, standby=True) == (24, 0)  # and off again
    # it still found off: the next refresh waits twice as long
    p.observe_round(exit=24, drafted=n, accepted=0, draft_s=0.01 * n, verify_s=0.1)
    for _ in range(2 * REFRESH_STEPS - 1):
        p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.1)
    assert p.round_choice(24, planned=8, standby=True) == (24, 0)
    p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.1)
    assert p.round_choice(24, planned=8, standby=True)[1] >= 4


def test_every_few_rounds_an_arm_drafts_one_token_past_its_best_length():
    """Positions past an arm's best length are reached by no round of it, so a stale low
    estimate there would cap its length for good; every LENGTH_PROBE_EVERY-th round drafts
    one more. Controls: the other rounds draft the best length; never past the plan."""
    from tandem.speculation.goodput import LENGTH_PROBE_EVERY

    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=False, explore_every=0)
    feed(p, exit=24, acceptance=0.5, draft_step=0.010, verify=0.1, rounds=LENGTH_PROBE_EVERY - 1)
    warm(p, verify=0.1)
    best = max(range(1, 9), key=lambda g: p.rate(24, g))
    assert best < 8 and p.round_choice(24, planned=8) == (24, best + 1)  # the arm's 8th round: a probe
    assert p.round_choice(24, planned=best) == (24, best)  # never past the plan
    p.observe_round(exit=24, drafted=8, accepted=4, draft_s=0.08, verify_s=0.1)
    assert p.round_choice(24, planned=8) == (24, max(range(1, 9), key=lambda g: p.rate(24, g)))  # control


def settled(acceptance, *, max_draft_len, draft_len):
    """One arm (exit 24) after 10 rounds at `acceptance` (0.02 s a draft step, 0.08 s to
    verify), off measured at 0.077 s a step, no refresh round due."""
    p = GoodputPolicy(exits=(24,), max_draft_len=max_draft_len, overlapped=False, explore_every=0)
    feed(p, exit=24, acceptance=acceptance, draft_step=0.020, verify=0.080, draft_len=draft_len, rounds=10)
    warm(p, verify=0.077)
    p.arms[24].seen_at = p.ar_steps
    return p


def test_a_requests_own_rounds_weigh_in_its_replans():
    """OWN_PRIOR_ROUNDS, at one draft token (a 0.02 s draft step, 0.08 s to verify 2 rows, off
    0.077 s a step, so drafting needs acceptance above ~0.57 to clear MIN_GAIN): the arm's
    shared estimate was pulled to 0 by a hard prompt, so a request without rounds of its own
    stays off (control); one whose own 5 rounds were all accepted drafts (blend 5/8); and on
    an arm whose shared estimate is 1, a request whose own 5 rounds were rejected stops
    (blend 3/8), where one without rounds drafts (control)."""
    from tandem.speculation.goodput import OWN_PRIOR_ROUNDS, RequestAcceptance

    def own(accepted):
        mine = RequestAcceptance()
        for _ in range(5):
            mine.add(drafted=1, accepted=accepted)
        return mine

    hard, easy = settled(0.0, max_draft_len=1, draft_len=1), settled(1.0, max_draft_len=1, draft_len=1)
    assert hard.round_choice(24, planned=1, standby=True)[1] == 0
    assert hard.round_choice(24, planned=1, standby=True, own={24: own(1)})[1] == 1
    assert hard.arms[24].acceptance(1, hard.prior, own(1))[0] == pytest.approx(5 / (OWN_PRIOR_ROUNDS + 5))
    assert easy.round_choice(24, planned=1)[1] == 1
    assert easy.round_choice(24, planned=1, own={24: own(0)})[1] == 0
    assert easy.arms[24].acceptance(1, easy.prior, own(0))[0] == pytest.approx(OWN_PRIOR_ROUNDS / (OWN_PRIOR_ROUNDS + 5))
    mixed = RequestAcceptance()
    mixed.add(drafted=4, accepted=2)  # positions 1-3 reached, 1-2 accepted
    assert mixed.reached == [1, 1, 1, 0] and mixed.accepted == [1, 1, 0, 0]


def test_a_requests_first_round_drafts_where_off_wins():
    """PROBE_MAX_CONCURRENCY: where its arm's estimate says off, a request's first round still
    drafts (at least REFRESH_LEN tokens), so that its own acceptance is known; later rounds
    (first=False), a first round under a heavier load, and one after more than
    CAUGHT_UP_PRICED target-only steps of its own stay off (the controls)."""
    from tandem.speculation.goodput import CAUGHT_UP_PRICED, PROBE_MAX_CONCURRENCY, REFRESH_LEN

    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=False, explore_every=0)
    feed(p, exit=24, acceptance=0.0, draft_step=0.020, verify=0.100, draft_len=4, rounds=10)
    warm(p, verify=0.077)
    p.arms[24].seen_at = p.ar_steps  # no refresh round due
    assert p.round_choice(24, planned=8, standby=True)[1] == 0
    assert p.round_choice(24, planned=8, standby=True, first=True)[1] >= REFRESH_LEN
    assert p.round_choice(24, planned=2, standby=True, first=True)[1] == 2  # never past the plan
    assert p.round_choice(24, 8, PROBE_MAX_CONCURRENCY + 1, standby=True, first=True)[1] == 0
    # a first round after target-only steps of its own is no probe: its draft feeds them too
    assert p.round_choice(24, planned=8, standby=True, first=True, catch_up=CAUGHT_UP_PRICED)[1] >= REFRESH_LEN
    assert p.round_choice(24, planned=8, standby=True, first=True, catch_up=CAUGHT_UP_PRICED + 1)[1] == 0


def test_a_shallower_arm_is_planned_and_moved_to_only_once_it_is_well_seen():
    """SHALLOW_ARM_ROUNDS: exit 8's 3-round trial was lucky (every draft accepted at a quarter
    of the full draft's step), so it prices best; on 3 rounds no request is planned onto it
    and a request on exit 24 does not move there; once exit 8 has SHALLOW_ARM_ROUNDS both do
    (the control)."""
    from tandem.speculation.goodput import SHALLOW_ARM_ROUNDS

    p = GoodputPolicy(exits=(8, 24), max_draft_len=8, overlapped=False, explore_every=0)
    feed(p, exit=24, acceptance=0.75, draft_step=0.020, verify=0.100, draft_len=4, rounds=20)
    feed(p, exit=8, acceptance=1.0, draft_step=0.005, verify=0.100, draft_len=4, rounds=3)
    warm(p, verify=0.077)
    assert p.rate(8, 4) > p.rate(24, 4)
    assert p.round_choice(24, planned=8, move=True)[0] == 24
    assert p.choose().exit == 24  # nor is a request planned onto it
    feed(p, exit=8, acceptance=1.0, draft_step=0.005, verify=0.100, draft_len=4, rounds=SHALLOW_ARM_ROUNDS - 3)
    assert p.round_choice(24, planned=8, move=True)[0] == 8
    assert p.choose().exit == 8
    assert p.round_choice(8, planned=8, move=True)[0] == 8  # from a shallow arm, deeper ones need min_samples only


def test_a_request_its_own_rounds_turned_off_drafts_again_after_a_while():
    """OWN_HALF_LIFE_STEPS and LONG_RUN_ALPHA, at one request at a time: an arm accepted in
    full for 10 rounds, then one request's 10 rounds rejected at position 1, taught to the arm
    too (as the router does). Position 1 then reads 0.8^10 = 0.11 recently (control: priced on
    that, the request stays off) and 0.98^10 = 0.82 in the long run. At 0.02 s a draft token,
    0.080 s to verify and 0.077 s a target-only step, drafting 8 (positions 2-8 accepted)
    clears MIN_GAIN over off where a_1 > (1.1 / 0.077 * 0.24 - 1) / 8 = 0.304. The request's
    a_1 is 3 * 0.82 / (3 + 10 w), w = 0.5 ** (idle / OWN_HALF_LIFE_STEPS): 0.19 at once and
    0.24 half a half-life later (off), 0.45 after two half-lives (drafts); the edge is at
    w = 0.51, about one half-life. On a chat-like arm (long run 0) it stays off however long
    it idles (control)."""
    from tandem.speculation.goodput import OWN_HALF_LIFE_STEPS, RequestAcceptance

    good, bad = settled(1.0, max_draft_len=8, draft_len=4), settled(0.0, max_draft_len=8, draft_len=4)
    rejected = RequestAcceptance()
    for _ in range(10):
        rejected.add(drafted=4, accepted=0)
        for p in (good, bad):
            p.observe_round(exit=24, drafted=4, accepted=0, draft_s=0.08, verify_s=0.080)
    for p in (good, bad):
        p.arms[24].seen_at = p.ar_steps  # no refresh round due
    assert good.arms[24].acceptance(1, good.prior)[0] == pytest.approx(0.8**10)
    assert good.arms[24].acceptance(1, good.prior, RequestAcceptance())[0] == pytest.approx(0.98**10)
    assert good.round_choice(24, planned=8, standby=True)[1] == 0  # control: the recent estimate says off

    def replan(policy, idle):
        return policy.round_choice(24, planned=8, own={24: rejected.aged(idle)})[1]

    assert replan(good, 0) == 0
    assert replan(good, OWN_HALF_LIFE_STEPS // 2) == 0
    assert replan(good, 2 * OWN_HALF_LIFE_STEPS) > 0
    assert replan(bad, 1000) == 0
    assert rejected.aged(OWN_HALF_LIFE_STEPS).reached[0] == pytest.approx(5.0) and rejected.aged(0) is rejected


def test_in_turn_under_load_a_draft_round_is_priced_as_the_whole_node_waiting():
    """Draft and target in turn on shared cores: while a request drafts, every request on
    the target waits. The 1.5B pack's measured curve, a shallow arm accepted 60% at one
    draft a round (d = 14 ms): alone it pays (1.6 tokens in 14 + 72 ms against one in 63 ms,
    1.17x); with 8 requests it is priced as 7 target-only steps and one draft round,
    7 + 1.6 tokens in 8 x (14 + V(9) = 123 ms), below off's 8 in V(8) = 117 ms: off. The
    control: the same numbers overlapped (separate cores, the draft hides behind V(16))
    draft at 8, as every request drafting at once was priced before."""
    curve = [0.063, 0.072, 0.087, 0.094, 0.099, 0.106, 0.114, 0.117, 0.123]
    batch = {18: 0.168, 36: 0.43, 72: 0.70}

    def policy(overlapped):
        p = GoodputPolicy(exits=(24,), max_draft_len=1, overlapped=overlapped, explore_every=0, block_costs=curve,
                          batch_costs=batch, alpha=0.05)
        for i in range(60):  # 3 of 5 rounds accepted: the EMA ends within 0.6 +- 0.05
            p.observe_round(exit=24, drafted=1, accepted=int(i % 5 < 3), draft_s=0.014, verify_s=0.072)
        warm(p, verify=0.063)
        return p

    in_turn, overlapped = policy(False), policy(True)
    assert in_turn.arms[24].acceptance(1, in_turn.prior)[0] == pytest.approx(0.6, abs=0.05)
    assert in_turn.round_choice(24, planned=1, concurrency=1)[1] == 1  # alone it pays
    assert in_turn.rate(24, 1, 8) < in_turn.off_rate(8)
    assert in_turn.round_choice(24, planned=1, concurrency=8)[1] == 0
    assert in_turn.choose(8).exit is None
    assert overlapped.round_choice(24, planned=1, concurrency=8)[1] == 1  # the control


# The 1.5B pack's measured cost curve on the 2-core AMX host (seconds for 1..9 rows, batches)
PACK_CURVE = [0.063, 0.072, 0.087, 0.094, 0.099, 0.106, 0.114, 0.117, 0.123]
PACK_BATCHES = {18: 0.168, 36: 0.43, 72: 0.70}


def test_no_exploration_where_an_all_accepted_round_could_not_pay():
    """Overlapped (draft and target on their own cores), one request, the pack's curve: with a
    0.2 s draft step even every draft accepted commits at best 2 tokens in max(0.2 s, V(2)),
    10/s, against off's 1 / V(1) = 15.9 (17.5 with MIN_GAIN), so an exploration (here every
    choice) of the arm, off since its drafts were rejected, does not run. Control: a 24 ms step
    (9 tokens in max(192 ms, V(9) = 123 ms), 47/s) explores."""

    def policy(step):
        p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=True, explore_every=1,
                          block_costs=PACK_CURVE, batch_costs=PACK_BATCHES)
        for _ in range(3):  # every draft rejected: off wins
            p.observe_round(exit=24, drafted=4, accepted=0, draft_s=4 * step, verify_s=0.099, step_rows=5)
        warm(p, verify=0.063)
        return p

    slow, fast = policy(0.2), policy(0.024)
    assert not slow.may_probe(24, 1) and fast.may_probe(24, 1)
    assert slow.choose(1) == Choice(exit=None, draft_len=0, rate=slow.off_rate(1), standby=24)
    ch = fast.choose(1)
    assert (ch.exit, ch.exploring) == (24, True)  # control


def test_in_turn_no_probe_round_above_probe_max_concurrency():
    """In turn, a round that measures an arm stalls every request on the node and first feeds
    the draft what the request ran without it (unpriced): trials, explorations, refresh rounds
    and first-round probes run only at up to PROBE_MAX_CONCURRENCY in flight, even where the
    all-accepted bound allows more (a 4 ms draft step: 8 drafts at 8 in flight, 16 tokens in
    8 x (32 ms + V(16) = 158 ms), 10.5/s against 9.4). Controls: at PROBE_MAX_CONCURRENCY, and
    overlapped at 8, it explores."""
    from tandem.speculation.goodput import PROBE_MAX_CONCURRENCY, REFRESH_STEPS

    def policy(overlapped):
        p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=overlapped, explore_every=1,
                          block_costs=PACK_CURVE, batch_costs=PACK_BATCHES)
        for _ in range(3):
            p.observe_round(exit=24, drafted=4, accepted=0, draft_s=4 * 0.004, verify_s=0.099, step_rows=5)
        warm(p, verify=0.063)
        return p

    p = policy(False)
    assert p._could_pay(24, 8) and not p.may_probe(24, PROBE_MAX_CONCURRENCY + 1)
    assert not p.choose(8).exploring
    for _ in range(2 * REFRESH_STEPS):
        p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.063)
    assert p.round_choice(24, planned=8, concurrency=8, standby=True, first=True) == (24, 0)
    assert p.round_choice(24, planned=8, concurrency=PROBE_MAX_CONCURRENCY, standby=True)[1] >= 4  # refresh
    assert p.choose(PROBE_MAX_CONCURRENCY).exploring
    assert policy(True).choose(8).exploring


def test_an_arm_whose_step_is_unmeasured_gets_its_trial_only_at_a_light_load_in_turn():
    """Exit 16 unmeasured beside a measured full draft: another arm's step bounds its own
    poorly (a draft step is mostly fixed cost), and a trial's first round feeds the draft the
    prompt while every request on the node waits, so in turn its trial is handed out only at
    up to PROBE_MAX_CONCURRENCY requests; meanwhile requests go to what is known (off on
    standby at 8). Controls: at that load, and overlapped at 8, exit 16 gets its trial."""
    from tandem.speculation.goodput import PROBE_MAX_CONCURRENCY

    def policy(overlapped):
        p = GoodputPolicy(exits=(16, 24), max_draft_len=8, overlapped=overlapped, explore_every=0,
                          block_costs=PACK_CURVE, batch_costs=PACK_BATCHES)
        for _ in range(3):  # the full draft's trial: every draft accepted
            p.observe_round(exit=24, drafted=4, accepted=4, draft_s=4 * 0.024, verify_s=0.099, step_rows=5)
        warm(p, verify=0.063)
        return p

    p = policy(False)
    heavy = p.choose(PROBE_MAX_CONCURRENCY + 1)
    assert heavy.exit != 16 and not heavy.exploring
    assert p.choose(8) == Choice(exit=None, draft_len=0, rate=p.off_rate(8), standby=24)
    light = p.choose(PROBE_MAX_CONCURRENCY)
    assert (light.exit, light.exploring) == (16, True)
    assert policy(True).choose(8).exit == 16


def test_nothing_measured_a_trial_waits_for_a_light_load_in_turn():
    """Before any draft step is measured nothing bounds a round's cost, and the first rounds of
    a trial also feed the draft its prompt (~0.2 s on the 2-core host, every record on the node
    waiting): in turn, a trial is handed out only at up to PROBE_MAX_CONCURRENCY requests.
    Controls: at that load, and overlapped at 8, the deepest exit gets it."""
    from tandem.speculation.goodput import PROBE_MAX_CONCURRENCY

    def policy(overlapped):
        return GoodputPolicy(exits=(16, 24), max_draft_len=8, overlapped=overlapped, explore_every=0,
                             block_costs=PACK_CURVE, batch_costs=PACK_BATCHES)

    p = policy(False)
    heavy = p.choose(PROBE_MAX_CONCURRENCY + 1)
    assert (heavy.exit, heavy.exploring, heavy.standby) == (None, False, 24)
    assert p.round_choice(24, planned=8, concurrency=8, standby=True) == (24, 0)  # and stays off
    light = p.choose(PROBE_MAX_CONCURRENCY)
    assert (light.exit, light.exploring) == (24, True)
    assert policy(True).choose(8).exit == 24


def test_no_probe_or_refresh_round_where_an_all_accepted_round_could_not_pay():
    """A draft step of 0.2 s against 0.1 s to verify: 8 drafts all accepted commit 9 tokens in
    1.7 s, 5.3/s against off's 10, so no acceptance could make this arm pay even alone: its
    refresh rounds (REFRESH_STEPS) and a request's first-round probe do not run. The control,
    a 0.01 s step, is test_an_arm_off_for_a_while_drafts_one_round_to_refresh_it."""
    from tandem.speculation.goodput import REFRESH_STEPS

    p = GoodputPolicy(exits=(24,), max_draft_len=8, overlapped=False, explore_every=0)
    feed(p, exit=24, acceptance=0.0, draft_step=0.2, verify=0.1)
    warm(p, verify=0.1)
    assert not p.may_probe(24, 1)
    for _ in range(4 * REFRESH_STEPS):
        p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.1)
        assert p.round_choice(24, planned=8, standby=True) == (24, 0)
    assert p.round_choice(24, planned=8, standby=True, first=True) == (24, 0)


def test_a_forward_of_many_requests_is_priced_from_their_own_target_only_step():
    """Through gRPC at 8 code requests in flight: 8 requests' target-only forward took 150 ms,
    while one request's 9-row block (8 drafts, timed at one request) took 123 ms. A round of
    one draft at 8 in flight (a forward of 8 requests, 9 rows) is priced from the 8 requests'
    150 ms scaled along the curve, 150 x 123 / 117 = 158 ms: exit 8 (7.6 ms a step, 90%
    accepted) commits (7 + 1.9) tokens in 8 x 165 ms, 6.7/s a request against off's 6.7 (7.3
    with MIN_GAIN): off. Negative control: priced from the 9-row block as measured, 8.5/s,
    it drafted (what ran 0.90x of off)."""
    def policy():
        p = GoodputPolicy(exits=(8,), max_draft_len=1, overlapped=False, explore_every=0,
                          block_costs=PACK_CURVE, batch_costs=PACK_BATCHES, alpha=0.05)
        for i in range(60):  # 9 of 10 rounds accepted: the EMA ends within 0.9 +- 0.05
            p.observe_round(exit=8, drafted=1, accepted=int(i % 10 < 9), draft_s=0.0076, verify_s=0.123, step_rows=9)
        for _ in range(60):
            p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.150, step_rows=8)
        return p

    p = policy()
    v = 0.150 * PACK_CURVE[8] / PACK_CURVE[7]
    a = p.arms[8].acceptance(1, p.prior)[0]
    assert a == pytest.approx(0.9, abs=0.05)
    assert p.rate(8, 1, 8) == pytest.approx((7 + 1 + a) / (8 * (0.0076 + v)), rel=1e-3)
    assert p.round_choice(8, planned=1, concurrency=8)[1] == 0
    old = policy()
    old._forward_time = lambda sequences, rows: old.verify_time(rows)  # the control: rows alone
    assert old.round_choice(8, planned=1, concurrency=8)[1] == 1


# A forward's time per rows (1..5) of the 1.5B pack on ggml on the 2-core EPYC, seen through gRPC
# with the draft on the same cores (stop 43's trace): 65 ms a step, 190 ms for 5 rows.
EPYC_CURVE = [0.065, 0.110, 0.140, 0.165, 0.190]


def test_a_probe_runs_only_where_a_plausible_acceptance_could_pay():
    """PLAUSIBLE_MIN_REQUESTS, PLAUSIBLE_REQUESTS. In turn, one request, EPYC_CURVE, a 20 ms
    draft step, the arm off (1 of 4 drafts accepted: 2 tokens in 130 ms, 15.4/s against off's
    15.4, 16.9 with MIN_GAIN). Every draft accepted, 4 drafts commit 5 tokens in 270 ms, 18.5/s:
    a probe could pay, so a request's first round probes while fewer than
    PLAUSIBLE_MIN_REQUESTS requests ended on the arm. Three requests that reached 2 of 4 (each
    (40 + 3 x 0.5) / 63 = 0.66 against the arm's long run) make 0.66 the plausible acceptance:
    at best 12.8/s, so no probe, refresh or exploration runs. Control: three requests all
    accepted (0.98: 4.8 tokens in 270 ms, 17.8/s) probe again."""
    from tandem.speculation.goodput import PLAUSIBLE_MIN_REQUESTS, PLAUSIBLE_REQUESTS, REFRESH_LEN, RequestAcceptance

    def policy(accepted_by_requests):
        p = GoodputPolicy(exits=(12,), max_draft_len=4, overlapped=False, explore_every=0, block_costs=EPYC_CURVE)
        feed(p, exit=12, acceptance=0.25, draft_step=0.020, verify=0.190, draft_len=4, rounds=10)
        warm(p, verify=0.065)
        p.arms[12].seen_at = p.ar_steps  # no refresh round due
        for accepted in accepted_by_requests:
            own = RequestAcceptance()
            for _ in range(20):
                own.add(drafted=4, accepted=accepted)
            p.end_request({12: own, 99: own})  # an exit the policy does not serve is ignored
        return p

    few = policy([2] * (PLAUSIBLE_MIN_REQUESTS - 1))
    assert few.arms[12].plausible_acceptance() == 1.0
    assert few.round_choice(12, planned=4, standby=True) == (12, 0)  # off wins at the arm's estimate
    assert few.may_probe(12, 1) and few.round_choice(12, planned=4, standby=True, first=True)[1] >= REFRESH_LEN
    hard = policy([2] * PLAUSIBLE_MIN_REQUESTS)
    assert hard.arms[12].plausible_acceptance() == pytest.approx((40 + 3 * 0.5) / 63)
    assert not hard.may_probe(12, 1)
    assert hard.round_choice(12, planned=4, standby=True, first=True) == (12, 0)
    hard.arms[12].seen_at = hard.ar_steps - 10**6  # a refresh round due: it does not run either
    assert hard.round_choice(12, planned=4, standby=True) == (12, 0)
    easy = policy([4] * PLAUSIBLE_MIN_REQUESTS)  # control
    assert easy.arms[12].plausible_acceptance() == pytest.approx((80 + 3 * 0.5) / 83)
    assert easy.may_probe(12, 1) and easy.round_choice(12, planned=4, standby=True, first=True)[1] >= REFRESH_LEN
    aged = policy([4] + [2] * PLAUSIBLE_REQUESTS)  # the easy request left the window
    assert aged.arms[12].plausible_acceptance() == pytest.approx((40 + 3 * 0.5) / 63)
    assert not aged.may_probe(12, 1)


def test_every_few_first_rounds_refused_by_the_plausible_bound_probe_anyway():
    """PLAUSIBLE_REQUESTS: where only the plausible acceptance refuses a first-round probe
    (every draft accepted could pay), every PLAUSIBLE_REQUESTS-th such first round probes, so
    that a change of traffic (easier requests) reaches the bound. Controls: later rounds
    (first=False) and a load above PROBE_MAX_CONCURRENCY never count or probe; nor does an arm
    whose all-accepted round could not pay (a 0.2 s draft step)."""
    from tandem.speculation.goodput import PLAUSIBLE_MIN_REQUESTS, PLAUSIBLE_REQUESTS, PROBE_MAX_CONCURRENCY, RequestAcceptance

    def policy(step):
        p = GoodputPolicy(exits=(12,), max_draft_len=4, overlapped=False, explore_every=0, block_costs=EPYC_CURVE)
        feed(p, exit=12, acceptance=0.25, draft_step=step, verify=0.190, draft_len=4, rounds=10)
        warm(p, verify=0.065)
        p.arms[12].seen_at = p.ar_steps + 10**6  # no refresh round in this test
        own = RequestAcceptance()
        for _ in range(20):
            own.add(drafted=4, accepted=2)
        for _ in range(PLAUSIBLE_MIN_REQUESTS):
            p.end_request({12: own})
        return p

    p = policy(0.020)
    assert not p.may_probe(12, 1)
    for _ in range(3 * PLAUSIBLE_REQUESTS):  # controls: never counted
        assert p.round_choice(12, planned=4, standby=True) == (12, 0)
        assert p.round_choice(12, 4, PROBE_MAX_CONCURRENCY + 1, standby=True, first=True) == (12, 0)
    lens = [p.round_choice(12, planned=4, standby=True, first=True)[1] for _ in range(2 * PLAUSIBLE_REQUESTS)]
    assert [i for i, n in enumerate(lens) if n] == [PLAUSIBLE_REQUESTS - 1, 2 * PLAUSIBLE_REQUESTS - 1]
    slow = policy(0.2)  # control: no acceptance pays
    assert all(slow.round_choice(12, planned=4, standby=True, first=True) == (12, 0) for _ in range(3 * PLAUSIBLE_REQUESTS))


def test_a_round_that_resumes_drafting_is_priced_with_its_catch_up():
    """A round whose draft first fed tokens it missed teaches the arm's feed time per token:
    (0.1 s - 1 draft x 20 ms) / 40 tokens = 2 ms. A request that drafts 1 token a round (2
    tokens in 20 ms + 80 ms, 20/s against off's 13.0, 14.3 with MIN_GAIN) resumes drafting after
    n target-only steps only while 2 / (0.1 + 0.002 n) clears that: n <= 19. Controls: without
    a catch-up it drafts; a round that fed 2 tokens teaches no feed time."""
    p = settled(1.0, max_draft_len=1, draft_len=1)
    p.observe_round(exit=24, drafted=1, accepted=1, draft_s=0.021, verify_s=0.08, caught_up=2)
    assert p.arms[24].feed_s.value is None  # control: an ordinary round
    p.observe_round(exit=24, drafted=1, accepted=1, draft_s=0.02 + 40 * 0.002, verify_s=0.08, caught_up=40)
    assert p.arms[24].feed_s.value == pytest.approx(0.002, rel=0.03)
    assert p.round_choice(24, planned=1) == (24, 1)
    assert p.round_choice(24, planned=1, catch_up=19) == (24, 1)
    assert p.round_choice(24, planned=1, catch_up=21) == (24, 0)
