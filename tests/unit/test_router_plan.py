"""Router.plan (the planner, speculation/plan.py, plus a log line) for `sorted`: with a draft that has exits below its full depth it runs S2D
sorted drafting; without any (no trained exits on a fresh machine) it falls back to sd,
reports sd as the method that ran, and logs the reason once per target."""

from __future__ import annotations

import logging

import pytest

from tandem.services.router import RouteRequest, Router, TargetRoute
from tandem.speculation.plan import RoundPlanner
from tandem.speculation.sampling import SamplingParams
from tandem.speculation.sorted_policy import ExitPolicy


def route(sorted_policy):
    return TargetRoute(name="t", model="m", tokenizer=None, eos_ids=(0,), max_context=512, vocab_size=8,
                       default_method="auto", max_draft_len=8, policy=None, sorted_policy=sorted_policy)


def request():
    return RouteRequest(request_id="r", target="t", prompt_ids=(1, 2), sampling=SamplingParams(), max_new_tokens=4,
                        method="sorted")


def cpu_policy():
    """A PEARL policy over a 4-bit CPU target whose forward time grows with rows (seconds for
    1..9 rows, then batches of 9-row blocks), after rounds at one request: 7 of 8 drafts accepted."""
    from tandem.speculation.goodput import GoodputPolicy

    policy = GoodputPolicy(exits=(4,), max_draft_len=8, overlapped=True, explore_every=0,
                           block_costs=[0.035, 0.040, 0.045, 0.049, 0.100, 0.105, 0.110, 0.115, 0.160],
                           batch_costs={18: 0.30, 36: 0.62, 72: 1.25})
    for _ in range(3):
        policy.observe_round(exit=4, drafted=8, accepted=7, draft_s=0.08, verify_s=0.160, step_rows=9)
        policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.035, step_rows=1)
    return policy


def auto_plan(policy):
    """A route whose `auto` runs sd under `policy`, and the router's plan for one request."""
    rt = route(None)
    rt.default_method, rt.policy = "sd", policy
    auto = RouteRequest(request_id="r", target="t", prompt_ids=(1, 2), sampling=SamplingParams(), max_new_tokens=4,
                        method="auto")
    return rt, Router(engine=None, routes={"t": rt}).plan(rt, auto)


class Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_sorted_with_exits_runs_sorted():
    policy = ExitPolicy(exits=(2, 4), thresholds=(0.8,))
    r = Router(engine=None, routes={"t": route(policy)})
    p = r.plan(r.routes["t"], request())
    assert p.spec.method == "sorted" and p.spec.policy == policy and p.choice is None


def test_sorted_without_exits_falls_back_to_sd_and_says_so_once(caplog):
    r = Router(engine=None, routes={"t": route(None)})
    with caplog.at_level(logging.WARNING, logger="tandem.router"):
        for _ in range(3):
            p = r.plan(r.routes["t"], request())
            assert p.spec.method == "sd" and p.spec.policy is None and p.spec.draft_len == 6 and p.choice is None
    warnings = [rec for rec in caplog.records if "no exit below its full depth" in rec.getMessage()]
    assert len(warnings) == 1 and "train-exits" in warnings[0].getMessage()


def test_rounds_of_explicit_sd_price_the_full_draft_not_the_target_only_step():
    """Issue 12: an explicit sd/pearl request carries no exit policy; its rounds (a draft
    block verified) were recorded as target-only steps, skewing the on/off decision."""
    import asyncio

    from tandem.actors.speculative import GenerationResult
    from tandem.speculation.goodput import GoodputPolicy
    from tandem.speculation.stats import SpecStats

    class Engine:  # one layer under test: the router; the engine reports two rounds
        async def agenerate(self, target, prompt, *, spec, on_round, on_tokens, **kw):
            for i in range(2):
                on_round({"index": i, "start_ns": 0, "end_ns": 1, "drafted": 4, "accepted": 3, "emitted": 4,
                          "exits": [], "draft_s": 0.04, "verify_s": 0.5})
                on_tokens([5, 6, 7, 8])
            return GenerationResult(tokens=[5, 6, 7, 8] * 2, finish_reason="length", stats=SpecStats(), prompt_tokens=2)

    policy = GoodputPolicy(exits=(2, 4), max_draft_len=8)
    rt = route(None)
    rt.policy, rt.tokenizer = policy, Tokenizer()
    r = Router(engine=Engine(), routes={"t": rt})
    req = RouteRequest(request_id="r", target="t", prompt_ids=(1, 2), sampling=SamplingParams(), max_new_tokens=8, method="sd")

    async def run():
        return [d async for d in r.generate(req)]

    asyncio.run(run())
    assert policy.ar_steps == 0 and 1 not in policy.verify_s  # the bug: 0.5 s here as the target-only step
    assert policy.arms[4].rounds == 2 and policy.arms[2].rounds == 0  # the full draft's arm
    assert policy.verify_time(5) == 0.5


def test_auto_is_priced_at_the_requests_running_on_each_replica():
    """The router plans `auto` at the concurrency its target's actors will see: the requests
    running there plus this one, per replica (speculation/goodput.py prices the rows)."""
    rt = route(None)
    rt.policy = cpu_policy()
    r = Router(engine=None, routes={"t": rt})
    auto = RouteRequest(request_id="r", target="t", prompt_ids=(1, 2), sampling=SamplingParams(), max_new_tokens=4)
    alone = r.plan(rt, auto)
    assert alone.spec.method == "pearl" and alone.choice.exit == 4 and not alone.standby  # alone: speculation pays
    rt.running = 7
    loaded = r.plan(rt, auto)  # 8 sharing each forward: off pays, on standby for the exit
    assert loaded.choice.exit is None and loaded.standby and loaded.observed_exit == 4
    assert RoundPlanner(rt, loaded).next(8).draft_len == 0  # its rounds are target-only steps at that load
    assert RoundPlanner(rt, loaded).next(1).draft_len > 0  # and draft once it runs alone
    rt.replicas = 4
    again = r.plan(rt, auto)
    assert again.choice.exit == 4 and not again.standby  # 2 per replica: it pays again


def test_auto_rounds_are_replanned_at_the_load_of_each_round():
    """A request planned alone keeps its plan for life no more: the router hands the engine a
    per-round re-plan (round_plan) that reads the target's running requests at each
    round; an explicit method gets none and runs as asked."""
    import asyncio

    from tandem.actors.speculative import GenerationResult
    from tandem.speculation.stats import SpecStats

    rt = route(None)
    rt.policy = cpu_policy()

    rt.tokenizer = Tokenizer()
    seen: dict[str, list] = {}

    class Engine:  # the engine asks before each round; the test moves the load between rounds
        async def agenerate(self, target, prompt, *, spec, on_tokens, round_plan=None, **kw):
            seen["method"], seen["hook"] = spec.method, round_plan
            lens = []
            if round_plan is not None:
                for others in (0, 7, 7, 0):  # others running beside it on the one replica
                    rt.running = 1 + others
                    lens.append(round_plan().draft_len)
                rt.running = 1
            seen["lens"] = lens
            on_tokens([5])
            return GenerationResult(tokens=[5], finish_reason="length", stats=SpecStats(), prompt_tokens=2)

    r = Router(engine=Engine(), routes={"t": rt})

    def run(method):
        req = RouteRequest(request_id="r", target="t", prompt_ids=(1, 2), sampling=SamplingParams(), max_new_tokens=1,
                           method=method)

        async def go():
            return [d async for d in r.generate(req)]

        asyncio.run(go())

    run("auto")
    first, busy, busy2, last = seen["lens"]
    assert seen["method"] == "pearl" and first > 0 and last == first and busy == busy2 == 0
    run("pearl")  # explicit: as asked, every round
    assert seen["method"] == "pearl" and seen["hook"] is None


def test_a_trial_lasts_its_rounds_then_the_request_drafts_from_the_best_arm():
    """An arm's trial (or a periodic exploration) costs the policy's min_samples rounds, not
    a whole request: RoundPlanner keeps the request on the explored arm, at the trial's
    length, for that many drafting rounds, then re-plans it onto the best arm; each round
    teaches the arm that drafted it. Before, an exploring request drafted from its arm for
    life or went target-only (seen through gRPC at 0.7x of the others)."""
    from tandem.speculation.goodput import GoodputPolicy

    policy = GoodputPolicy(exits=(2, 4), max_draft_len=8, overlapped=False, explore_every=0)
    for _ in range(3):
        policy.observe_round(exit=4, drafted=8, accepted=7, draft_s=0.08, verify_s=0.060)
        policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.035)
    rt, plan = auto_plan(policy)
    assert plan.choice.exit == 2 and plan.choice.exploring  # exit 2 is untried: its trial
    assert plan.spec.draft_len == 8  # sized for the cap: later rounds may draft more
    rounds = RoundPlanner(rt, plan)
    for _ in range(policy.min_samples):
        r = rounds.next(1)
        assert r.draft_len == plan.choice.draft_len and r.policy is None  # the plan's own exit
        rounds.observe({"drafted": r.draft_len, "accepted": 0, "draft_s": 0.004 * r.draft_len, "verify_s": 0.05,
                        "exits": {2: r.draft_len}})
    assert policy.arms[2].rounds == policy.min_samples
    r = rounds.next(1)
    assert r.policy == ExitPolicy.single(4) and r.draft_len == policy.best_draft_len(4)[0]
    rounds.observe({"drafted": r.draft_len, "accepted": r.draft_len, "draft_s": 0.01 * r.draft_len, "verify_s": 0.06,
                    "exits": {4: r.draft_len}})
    assert policy.arms[4].rounds == 4 and policy.arms[2].rounds == 3  # taught under the exit that drafted it
    # it moves once: from here its own (new) arm is re-planned, as any request's
    for _ in range(20):  # exit 2 turns out the best arm
        policy.observe_round(exit=2, drafted=8, accepted=8, draft_s=0.0008, verify_s=0.06)
    assert policy.round_choice(4, 8, move=True)[0] == 2 and rounds.next(1).policy == ExitPolicy.single(4)


def test_a_request_that_ends_during_its_trial_gives_the_trial_back():
    """RoundPlanner.close (the router and the in-process engine call it when a request ends):
    a trial that saw fewer than min_samples rounds goes to the next request's plan. Control:
    a request that did not close holds it, and the next request is planned elsewhere."""
    from tandem.speculation.goodput import GoodputPolicy

    def policy():
        p = GoodputPolicy(exits=(2, 4), max_draft_len=8, overlapped=False, explore_every=0)
        for _ in range(3):
            p.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.035)
        return p

    for closes in (True, False):
        p = policy()
        rt, plan = auto_plan(p)
        assert plan.choice.exit == 4 and plan.choice.exploring  # the deepest arm's trial
        rounds = RoundPlanner(rt, plan)
        r = rounds.next(1)
        rounds.observe({"drafted": r.draft_len, "accepted": r.draft_len, "draft_s": 0.01, "verify_s": 0.06, "exits": {4: r.draft_len}})
        if closes:
            rounds.close()  # it ended after one round
        _, nxt = auto_plan(p)
        assert (nxt.choice.exit, nxt.choice.exploring) == ((4, True) if closes else (2, True))


def test_a_request_whose_arm_turns_out_worse_moves_once():
    """A shallow arm trusted after a lucky trial: a request planned onto it moves to the arm
    that is best at a round once its own is not, and only once (each move to a deeper exit
    makes the draft catch its deeper layers up). Control: while its arm stays best it stays."""
    from tandem.speculation.goodput import GoodputPolicy

    from tandem.speculation.goodput import SHALLOW_ARM_ROUNDS

    policy = GoodputPolicy(exits=(2, 4), max_draft_len=8, overlapped=False, explore_every=0)
    for _ in range(3):
        policy.observe_round(exit=4, drafted=4, accepted=3, draft_s=0.08, verify_s=0.060)
        policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.035)
    for _ in range(SHALLOW_ARM_ROUNDS):  # a shallow arm is planned onto once this well seen
        policy.observe_round(exit=2, drafted=4, accepted=4, draft_s=0.004, verify_s=0.060)
    rt, plan = auto_plan(policy)
    assert plan.choice.exit == 2 and not plan.choice.exploring
    rounds = RoundPlanner(rt, plan)
    assert rounds.next(1).policy is None  # control: its arm is the best, it stays
    for _ in range(10):  # exit 2's drafts stop being accepted
        rounds.observe({"drafted": 4, "accepted": 0, "draft_s": 0.004, "verify_s": 0.06, "exits": {2: 4}})
    r = rounds.next(1)
    assert r.policy == ExitPolicy.single(4) and r.draft_len > 0 and rounds.moved
    for _ in range(10):  # now exit 4's go bad and exit 2's recover: it stays where it moved
        policy.observe_round(exit=2, drafted=4, accepted=4, draft_s=0.004, verify_s=0.060)
        rounds.observe({"drafted": 4, "accepted": 0, "draft_s": 0.08, "verify_s": 0.06, "exits": {4: 4}})
    assert rounds.next(1).policy == ExitPolicy.single(4)


def test_a_request_probes_its_first_round_and_follows_its_own_acceptance():
    """A request planned off (standby) because its arm's shared estimate was pulled down by
    another prompt: its first round drafts (REFRESH_LEN tokens), and its own rounds, all
    accepted, keep it drafting. A
    second request whose own rounds are rejected goes back to target-only steps, while the
    first keeps drafting (its own acceptance, not the other's, decides)."""
    from tandem.speculation.goodput import REFRESH_LEN, GoodputPolicy

    policy = GoodputPolicy(exits=(4,), max_draft_len=8, overlapped=False, explore_every=0)
    for _ in range(10):
        policy.observe_round(exit=4, drafted=4, accepted=0, draft_s=0.08, verify_s=0.080)
    for _ in range(3):
        policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.077)
    policy.arms[4].seen_at = policy.ar_steps  # no refresh round due
    rt, plan = auto_plan(policy)
    assert plan.standby and plan.observed_exit == 4
    easy, hard = RoundPlanner(rt, plan), RoundPlanner(rt, auto_plan(policy)[1])
    first = easy.next(1)
    assert first.draft_len == REFRESH_LEN and hard.next(1).draft_len == REFRESH_LEN
    for _ in range(4):
        easy.observe({"drafted": REFRESH_LEN, "accepted": REFRESH_LEN, "draft_s": 0.02 * REFRESH_LEN,
                      "verify_s": 0.08, "exits": {4: REFRESH_LEN}})
        hard.observe({"drafted": REFRESH_LEN, "accepted": 0, "draft_s": 0.02 * REFRESH_LEN,
                      "verify_s": 0.08, "exits": {4: REFRESH_LEN}})
    assert hard.next(1).draft_len == 0
    assert easy.next(1).draft_len > 0
    assert easy.own[4].reached[:2] == [4, 4] and hard.own[4].reached[:2] == [4, 0]


def test_a_request_off_after_a_hard_stretch_drafts_again_after_its_target_only_steps():
    """A request whose first rounds are all rejected goes off; each target-only step it runs
    ages those rounds (OWN_HALF_LIFE_STEPS), and once they weigh little against the arm's
    long-run estimate (other requests, all accepted) it drafts again, its re-plan pricing its
    rounds as aged. Control: the same request re-planned with no steps in between stays off.
    Numbers as in test_goodput's test_a_request_its_own_rounds_turned_off_drafts_again_after_a_while
    (drafting clears MIN_GAIN where a_1 > 0.304): after its 12 rejected rounds the arm's long
    run reads 0.98^12 = 0.78 at position 1, the request's a_1 = 3 * 0.78 / (3 + 12 w), so it
    drafts again once w < 0.39: after about 1.35 half-lives (22 steps)."""
    from tandem.speculation.goodput import OWN_HALF_LIFE_STEPS, GoodputPolicy

    policy = GoodputPolicy(exits=(4,), max_draft_len=8, overlapped=False, explore_every=0)
    for _ in range(20):
        policy.observe_round(exit=4, drafted=4, accepted=4, draft_s=0.08, verify_s=0.080)
    for _ in range(3):
        policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.077)
    rt, plan = auto_plan(policy)
    assert not plan.standby
    hard = RoundPlanner(rt, plan)
    assert hard.next(1).draft_len > 0
    for _ in range(12):
        hard.observe({"drafted": 4, "accepted": 0, "draft_s": 0.08, "verify_s": 0.08, "exits": {4: 4}})
    policy.arms[4].seen_at = policy.ar_steps + 10**6  # no refresh round in this test
    assert hard.next(1).draft_len == 0 and hard.next(1).draft_len == 0  # control: no steps, still off
    steps = 0
    while hard.next(1).draft_len == 0 and steps < 10 * OWN_HALF_LIFE_STEPS:
        hard.observe({"drafted": 0, "accepted": 0, "draft_s": 0.0, "verify_s": 0.077, "exits": {}})
        steps += 1
    assert OWN_HALF_LIFE_STEPS < steps < 2 * OWN_HALF_LIFE_STEPS
    hard.observe({"drafted": 4, "accepted": 4, "draft_s": 0.08, "verify_s": 0.08, "exits": {4: 4}})
    assert hard.idle == 0 and hard.own[4].reached[0] == pytest.approx(12 * 0.5 ** (steps / OWN_HALF_LIFE_STEPS) + 1)


def test_a_trial_round_waits_for_a_load_at_which_it_may_run():
    """A request planned onto exit 16's trial alone; 7 others join before its rounds: in turn
    at 8 in flight, an arm whose step is not yet measured may not draft (test_goodput's
    test_an_arm_whose_step_is_unmeasured_gets_its_trial_only_at_a_light_load_in_turn), so its
    trial rounds are target-only steps until the load falls, and then draft its trial's
    rounds."""
    from tandem.speculation.goodput import GoodputPolicy

    curve = [0.063, 0.072, 0.087, 0.094, 0.099, 0.106, 0.114, 0.117, 0.123]
    policy = GoodputPolicy(exits=(16, 24), max_draft_len=8, overlapped=False, explore_every=0, block_costs=curve,
                           batch_costs={18: 0.168, 36: 0.43, 72: 0.70})
    for _ in range(3):
        policy.observe_round(exit=24, drafted=4, accepted=4, draft_s=0.096, verify_s=0.099, step_rows=5)
        policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.063, step_rows=1)
    rt, plan = auto_plan(policy)
    assert (plan.choice.exit, plan.choice.exploring) == (16, True)
    rounds = RoundPlanner(rt, plan)
    for _ in range(5):
        assert rounds.next(8).draft_len == 0
        rounds.observe({"drafted": 0, "accepted": 0, "draft_s": 0.0, "verify_s": 0.117, "step_rows": 8, "exits": {}})
    for _ in range(policy.min_samples):
        r = rounds.next(1)
        assert r.draft_len == plan.choice.draft_len
        rounds.observe({"drafted": r.draft_len, "accepted": r.draft_len, "draft_s": 0.016 * r.draft_len,
                        "verify_s": 0.099, "step_rows": 5, "exits": {16: r.draft_len}})
    assert policy.arms[16].rounds == policy.min_samples


def test_a_requests_rounds_teach_what_requests_reach_and_a_resumed_round_prices_its_catch_up():
    """RoundPlanner.close hands the policy the request's own rounds per arm
    (GoodputPolicy.end_request: what a probe may plausibly reach there); a request that never
    drafted hands nothing. Its re-plans pass the target-only steps it ran since its last
    drafting round as that round's catch-up (a first round's too: the prompt's feed is any
    drafting request's entry, the steps it ran first are not). As in test_goodput's
    test_a_round_that_resumes_drafting_is_priced_with_its_catch_up, at a feed of 3 ms a token:
    it resumes while 2 / (0.1 + 0.003 n) clears 14.3/s, after at most 13 steps."""
    from tandem.speculation.goodput import GoodputPolicy

    policy = GoodputPolicy(exits=(4,), max_draft_len=1, overlapped=False, explore_every=0)
    for _ in range(10):
        policy.observe_round(exit=4, drafted=1, accepted=1, draft_s=0.02, verify_s=0.080)
    for _ in range(3):
        policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.077)
    policy.observe_round(exit=4, drafted=1, accepted=1, draft_s=0.02 + 40 * 0.003, verify_s=0.08, caught_up=40)
    policy.arms[4].seen_at = policy.ar_steps + 10**6  # no refresh round in this test
    rt, plan = auto_plan(policy)
    assert not plan.standby and plan.observed_exit == 4
    idle = RoundPlanner(rt, plan)
    idle.close()
    assert len(policy.arms[4].requests) == 0  # it never drafted
    late = RoundPlanner(rt, plan)
    late.idle = 30  # target-only steps before its first round: priced
    assert late.next(1).draft_len == 0
    rounds = RoundPlanner(rt, plan)
    assert rounds.next(1).draft_len == 1  # control: at its start
    rounds.observe({"drafted": 1, "accepted": 1, "draft_s": 0.02, "verify_s": 0.08, "exits": {4: 1}})
    steps = 0
    while rounds.next(1).draft_len == 1 and steps < 100:
        rounds.observe({"drafted": 0, "accepted": 0, "draft_s": 0.0, "verify_s": 0.077, "exits": {}})
        steps += 1
    assert steps == 14  # idle 0..13 resume; at 14 the feed of its idle steps outweighs a round's gain
    rounds.close()
    assert len(policy.arms[4].requests) == 1 and policy.arms[4].requests[0] > 0.5
