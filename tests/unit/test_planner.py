"""The planner (speculation/plan.py): one definition of the method names, draft-length bounds
and defaults, the context-fit rule, and the plan a request gets on a target."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from tandem.speculation import plan as planner
from tandem.speculation.goodput import GoodputPolicy
from tandem.speculation.plan import DEFAULT_DRAFT_LEN, METHODS, SpecConfig, check_context, context_reserve, observe, plan
from tandem.speculation.sorted_policy import ExitPolicy


@dataclass
class Target:
    name: str = "t"
    default_method: str = "auto"
    max_draft_len: int = 8
    policy: GoodputPolicy | None = None
    sorted_policy: ExitPolicy | None = None


def teach(policy: GoodputPolicy, exit: int, *, rounds: int, drafted: int, accepted: int, draft_s: float, verify_s: float):
    for _ in range(rounds):
        policy.observe_round(exit=exit, drafted=drafted, accepted=accepted, draft_s=draft_s, verify_s=verify_s)


def test_method_names_are_the_protos():
    from tandem.services.wire import METHODS as wire_methods

    assert METHODS == wire_methods


def test_the_client_imports_the_planner_without_torch():
    code = "import sys, tandem.speculation.plan, tandem.services.wire; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_off_runs_the_target_alone():
    p = plan(Target(), "off")
    assert p.spec.method == "ar" and p.method_name == "off" and p.choice is None and p.fallback == ""


def test_explicit_methods_take_the_default_lengths_within_the_bounds():
    t = Target()
    assert plan(t, "sd").spec.draft_len == DEFAULT_DRAFT_LEN["sd"]
    assert plan(t, "pearl").spec.draft_len == DEFAULT_DRAFT_LEN["pearl"]
    s = plan(t, "spectr").spec
    assert s.method == "spectr" and s.draft_len == DEFAULT_DRAFT_LEN["spectr"] and s.k == planner.SPECTR_BRANCHES
    assert plan(t, "sd", max_draft_len=3).spec.draft_len == 3  # the request's bound
    assert plan(Target(max_draft_len=2), "pearl").spec.draft_len == 2  # the target's bound
    assert plan(t, "sd", draft_len=11).spec.draft_len == 11  # exact (CLI, bench): over the target's bound


def test_sorted_without_exits_falls_back_to_sd_and_says_why():
    p = plan(Target(), "sorted")
    assert p.spec.method == "sd" and p.spec.policy is None and "no exit below its full depth" in p.fallback
    policy = ExitPolicy(exits=(2, 4), thresholds=(0.8,))
    p = plan(Target(sorted_policy=policy), "sorted")
    assert p.spec.method == "sorted" and p.spec.policy == policy and p.fallback == "" and not p.observes


def test_no_draft_plans_the_target_alone():
    p = plan(Target(), "sd", has_draft=False)
    assert p.spec.method == "ar" and p.fallback == "no draft model"


def test_bad_method_and_bound_name_the_field():
    with pytest.raises(ValueError, match="method must be one of"):
        plan(Target(), "medusa")
    with pytest.raises(ValueError, match=r"speculation.max_draft_len must be in \[1, 64\]"):
        plan(Target(), "sd", max_draft_len=65)
    with pytest.raises(ValueError, match="draft_len must be an integer in"):
        SpecConfig(method="sd", draft_len=0)


def test_auto_asks_the_goodput_policy_and_its_rounds_teach_that_arm():
    policy = GoodputPolicy(exits=(2, 4), max_draft_len=8, overlapped=True)
    t = Target(policy=policy)
    p = plan(t, "auto")
    # nothing seen yet: the deepest exit is explored first
    assert p.spec.method == "pearl" and p.spec.policy == ExitPolicy.single(4) and p.choice.exploring
    assert p.observes and p.observed_exit == 4
    observe(t, p, {"drafted": 4, "accepted": 2, "draft_s": 0.01, "verify_s": 0.05})
    assert policy.arms[4].rounds == 1
    # a target whose default is sd speculates through the policy with the sd loop
    assert plan(Target(default_method="sd", policy=GoodputPolicy(exits=(4,), max_draft_len=8)), "auto").spec.method == "sd"
    # without a policy, auto is the target's default method with its default length
    assert plan(Target(), "auto").spec == SpecConfig(method="pearl", draft_len=DEFAULT_DRAFT_LEN["pearl"])


def test_auto_turns_speculation_off_where_it_does_not_pay():
    policy = GoodputPolicy(exits=(4,), max_draft_len=4, overlapped=False, explore_every=0)
    t = Target(policy=policy, default_method="sd")
    teach(policy, 4, rounds=3, drafted=4, accepted=0, draft_s=0.05, verify_s=0.06)  # nothing accepted
    policy.observe_round(exit=None, drafted=0, accepted=0, draft_s=0.0, verify_s=0.05)  # an off step
    p = plan(t, "auto")
    assert p.spec.method == "ar" and p.choice.exit is None and p.observes and p.observed_exit is None


def test_explicit_sd_teaches_the_full_draft_and_learns_its_length():
    # sequential pricing: a 4-bit target whose verification cost steps up past 4 rows
    costs = [1.0, 1.05, 1.1, 1.15, 2.0, 2.05, 2.1, 2.15, 3.0]
    policy = GoodputPolicy(exits=(2, 4), max_draft_len=8, overlapped=False, block_costs=costs)
    t = Target(policy=policy)
    first = plan(t, "sd")
    assert first.spec.draft_len == DEFAULT_DRAFT_LEN["sd"] and first.observed_exit == 4  # nothing learned yet
    assert plan(t, "sd", draft_lens={"sd": 3}).spec.draft_len == 3  # the caller's measured plan comes next
    teach(policy, 4, rounds=3, drafted=6, accepted=6, draft_s=6 * 0.01, verify_s=0.105)
    learned = plan(t, "sd", draft_lens={"sd": 3}).spec.draft_len
    assert learned == policy.best_draft_len(4)[0]
    assert learned == 3  # all accepted, cheap draft: the longest block inside the 4-row tile
    # an overlapped (router) policy prices other rounds: explicit sd and pearl keep their
    # defaults (PEARL's window is calibrated, not learned: no bonus token on a full accept)
    pearl_policy = GoodputPolicy(exits=(4,), max_draft_len=8, overlapped=True, block_costs=costs)
    teach(pearl_policy, 4, rounds=3, drafted=6, accepted=6, draft_s=6 * 0.01, verify_s=0.105)
    assert pearl_policy.best_draft_len(4)[0] != DEFAULT_DRAFT_LEN["pearl"]  # else the next lines prove nothing
    assert plan(Target(policy=pearl_policy), "sd").spec.draft_len == DEFAULT_DRAFT_LEN["sd"]
    assert plan(Target(policy=pearl_policy), "pearl").spec.draft_len == DEFAULT_DRAFT_LEN["pearl"]
    assert plan(Target(policy=pearl_policy), "pearl", draft_lens={"pearl": 3}).spec.draft_len == 3  # calibrated window


def test_context_rule_boundary():
    d = 6
    fits = 512 - 100 - context_reserve(d)
    check_context(100, fits, 512, draft_len=d)
    with pytest.raises(ValueError, match=r"^sampling.max_new_tokens: prompt \(100\)"):
        check_context(100, fits + 1, 512, draft_len=d)
    with pytest.raises(ValueError, match="^prompt: 512 tokens"):
        check_context(512, 1, 512, draft_len=0)
    with pytest.raises(ValueError, match="^sampling.max_new_tokens must be >= 1"):
        check_context(10, 0, 512, draft_len=0)
