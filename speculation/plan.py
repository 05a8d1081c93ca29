"""The planner: what a request may ask for, and how that becomes one speculation plan.

Defined once here, for every way in (gRPC, `tandem generate --local`, `tandem bench`,
`tandem batch`):
- the method names a request may use (METHODS) and the loops the engine runs (LOOPS),
- the draft length's bounds and per-method defaults (`draft_len`: draft tokens per round, the
  one name from the proto's `max_draft_len` bound down to the drafter),
- SpecConfig, the plan one request runs with,
- the context-fit rule (how many positions past prompt + max_new_tokens a request may touch),
- `plan()`: method, exit and draft length for one request on one target, from what the
  target's goodput policy has learned (speculation/goodput.py) and its trained exits.

Pure Python on purpose (no torch): the client imports its names and bounds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Protocol

from tandem.speculation.goodput import Choice, GoodputPolicy, RequestAcceptance
from tandem.speculation.sorted_policy import ExitPolicy

# What a request names (tandem.v1 SpeculationMethod, lower-cased; services/wire.py derives the
# same tuple from the proto and a test holds the two equal). "auto": the target's goodput
# policy picks; "off": the target alone.
METHODS: tuple[str, ...] = ("auto", "off", "sd", "sorted", "pearl", "spectr")
# What the engine runs (actors/speculative.py): "ar" is the target alone, what "off" plans to.
LOOPS: tuple[str, ...] = ("ar", "sd", "sorted", "pearl", "spectr")

MAX_DRAFT_LEN = 64  # SpeculationOptions.max_draft_len is documented as 1..64
DEFAULT_MAX_DRAFT_LEN = 8  # a target's bound when its config names none
# The draft length of a request that names none, before anything about the target is known
# (a target that measured its costs plans its own: LocalEngine, the router's goodput policy).
DEFAULT_DRAFT_LEN: Mapping[str, int] = {"ar": 1, "sd": 6, "sorted": 6, "pearl": 8, "spectr": 4}
# Target-only steps (off, and the rounds the goodput policy plans without drafts) one call
# to the target runs back to back (Verifier.steps, TargetWorker.steps): each call costs the
# router and Ray a few ms on the cores the forward runs on, paid once per this many tokens.
# The price: such tokens stream in bursts of up to this many, and a re-plan waits for them.
# TANDEM_TARGET_STEPS sets it (1: one call a step, as before; for comparisons).
TARGET_STEPS_PER_CALL = max(1, int(os.environ.get("TANDEM_TARGET_STEPS", "4")))
SPECTR_BRANCHES = 2  # SpecTr's k: draft branches verified together
MAX_BRANCHES = 16


def context_reserve(draft_len: int) -> int:
    """KV positions past prompt + max_new_tokens that a request may touch: the block being
    verified (draft_len + 1 rows) and, for PEARL, the block drafted ahead of it, plus slack.
    The runtime sizes its caches with the same rule (actors/speculative.py run_request)."""
    return 2 * int(draft_len) + 8


def kv_copies(spec: SpecConfig) -> int:
    """Caches of one request an actor holds at once: SpecTr drafts and verifies each of its k
    branches on its own copy of the request's cache (Drafter.branches_batch, Verifier.step:
    runner.fork, at the cache's full capacity), so a round holds k; any other method one.
    Admission reserves KV for that many (services/router.py)."""
    return spec.k if spec.method == "spectr" else 1


def per_replica(requests: int, replicas: int) -> int:
    """Requests one of `replicas` actors serves when they are spread evenly (rounded up)."""
    return -(-int(requests) // max(1, int(replicas)))


def check_context(prompt_len: int, max_new_tokens: int, max_context: int, *, draft_len: int, target: str = "") -> None:
    """ValueError naming the field when a request cannot fit the target's context with
    draft_len draft tokens in flight (0: the target alone)."""
    where = f"the context of {target!r}" if target else "the model's context"
    if prompt_len < 1:
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"sampling.max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len >= max_context:
        raise ValueError(f"prompt: {prompt_len} tokens; {where} is {max_context}")
    if prompt_len + max_new_tokens + context_reserve(draft_len) > max_context:
        raise ValueError(
            f"sampling.max_new_tokens: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) + "
            f"{context_reserve(draft_len)} positions for draft blocks exceed {where} ({max_context})"
        )


@dataclass(frozen=True)
class SpecConfig:
    """How one request speculates: the loop, draft tokens per round, exits."""

    method: str = "sd"  # one of LOOPS
    draft_len: int = DEFAULT_DRAFT_LEN["sd"]  # draft tokens per round (PEARL: the window)
    policy: ExitPolicy | None = None  # exits and thresholds (None: the draft's full depth)
    k: int = SPECTR_BRANCHES  # SpecTr branches
    pre_verify: bool = True  # PEARL: a 1-token block after a rejection

    def __post_init__(self) -> None:
        if self.method not in LOOPS:
            raise ValueError(f"method must be one of {', '.join(LOOPS)}, got {self.method!r}")
        n = self.draft_len
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_DRAFT_LEN:
            raise ValueError(f"draft_len must be an integer in [1, {MAX_DRAFT_LEN}], got {n!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if self.k > MAX_BRANCHES:
            raise ValueError(f"k must be <= {MAX_BRANCHES}, got {self.k}")


class PlanTarget(Protocol):
    """What the planner reads of a target (services/router.py TargetRoute; actors/local.py
    LocalEngine's own)."""

    name: str
    default_method: str  # what "auto" means here: "auto" (the goodput policy) or a method
    max_draft_len: int  # the target's bound on draft_len
    policy: GoodputPolicy | None  # live goodput model over the draft's exits (None: none)
    sorted_policy: ExitPolicy | None  # the draft's exits below its full depth (None: none)


@dataclass(frozen=True)
class Plan:
    """One request's plan. `choice`: the goodput policy's pick (auto only). `observed_exit`:
    the exit whose arm this request's rounds teach (None with `observes` set: target-only
    steps); `fallback`: why the plan is not what was asked ("" when it is)."""

    spec: SpecConfig
    asked: str
    choice: Choice | None = None
    observes: bool = False
    observed_exit: int | None = None
    fallback: str = ""

    @property
    def standby(self) -> bool:
        """Planned off by the goodput policy but run by a drafting loop whose rounds are
        target-only steps until a re-plan says drafting from `observed_exit` pays (a burst
        planned before anything was measured, or off at the load it joined)."""
        return self.choice is not None and self.choice.exit is None and self.spec.method != "ar"

    @property
    def method_name(self) -> str:
        """The method as the response reports it (the loop "ar" is "off")."""
        return "off" if self.spec.method == "ar" else self.spec.method


def learned_draft_len(method: str, target: PlanTarget) -> int | None:
    """The draft length the target's goodput policy has learned for its full draft, for sd
    and sorted when the policy prices sequential rounds and has seen enough of them; else
    None. PEARL's window is not learned here: the policy's round model takes a bonus token
    per round, which a fully accepted PEARL block does not, so its window comes from the
    cost curve at calibration (actors/local.py pearl_window) or the default."""
    policy = target.policy
    if policy is None or method not in ("sd", "sorted") or policy.overlapped:
        return None
    full = policy.exits[-1]
    return policy.best_draft_len(full)[0] if policy.arms[full].rounds >= policy.min_samples else None


def plan(
    target: PlanTarget,
    method: str = "auto",
    *,
    max_draft_len: int | None = None,
    draft_len: int | None = None,
    has_draft: bool = True,
    draft_lens: Mapping[str, int] | None = None,
    concurrency: int = 1,
) -> Plan:
    """Method, exit and draft length for one request on `target`.

    method: one of METHODS, or "ar" (= "off"). max_draft_len: the request's bound (the
    target's when None). draft_len: an exact length (CLI and bench only; bounded by
    MAX_DRAFT_LEN, not by the target). draft_lens: per-method defaults the caller measured
    for this target (LocalEngine: the sd length planned from its cost curve, PEARL's
    window), used before the goodput policy has learned one. concurrency: the requests that
    will share one target actor's forwards with this one, itself included (auto prices its
    choice at that load; speculation/goodput.py).
    """
    if method not in METHODS and method != "ar":
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if max_draft_len is not None and not 1 <= max_draft_len <= MAX_DRAFT_LEN:
        raise ValueError(f"speculation.max_draft_len must be in [1, {MAX_DRAFT_LEN}], got {max_draft_len}")
    asked = method
    if method == "auto":
        method = target.default_method
    cap = max_draft_len or target.max_draft_len
    if method in ("off", "ar") or not has_draft:
        fallback = "" if method in ("off", "ar") else "no draft model"
        return Plan(SpecConfig(method="ar", draft_len=1), asked, observes=target.policy is not None, fallback=fallback)

    def length(m: str) -> int:
        # exact if given; else learned live, else measured by the caller, else the default
        if draft_len is not None:
            return int(draft_len)
        n = learned_draft_len(m, target)
        if n is None:
            n = (draft_lens or {}).get(m, DEFAULT_DRAFT_LEN[m])
        return max(1, min(cap, n))

    def full_draft(m: str, *, fallback: str = "") -> Plan:
        # explicit sd/pearl (and sorted without exits) run the full draft: its rounds teach
        # the policy's deepest arm, whatever the policy prices
        full = target.policy.exits[-1] if target.policy is not None else None
        return Plan(SpecConfig(method=m, draft_len=length(m)), asked, observes=full is not None, observed_exit=full,
                    fallback=fallback)

    if method == "sorted":
        if target.sorted_policy is None:
            return full_draft("sd", fallback="the draft has no exit below its full depth (no trained exits)")
        return Plan(SpecConfig(method="sorted", draft_len=length("sorted"), policy=target.sorted_policy), asked)
    if method == "spectr":
        return Plan(SpecConfig(method="spectr", draft_len=length("spectr"), k=SPECTR_BRANCHES), asked)
    if method in ("sd", "pearl") and asked != "auto":
        return full_draft(method)
    # auto (or a target whose default is sd/pearl): the goodput policy picks exit and length
    base = method if method in ("sd", "pearl") else ("pearl" if target.policy is None or target.policy.overlapped else "sd")
    if target.policy is None:
        return Plan(SpecConfig(method=base, draft_len=length(base)), asked)
    choice = target.policy.choose(concurrency)
    if choice.exit is None and choice.standby is not None and draft_len is None:
        # off for now, on standby: its rounds draft (up to the cap) once a re-plan at that
        # round's load says it pays; the rest are target-only steps, as off's are
        return Plan(SpecConfig(method=base, draft_len=max(1, min(cap, target.policy.max_draft_len)),
                               policy=ExitPolicy.single(choice.standby)),
                    asked, choice=choice, observes=True, observed_exit=choice.standby)
    if choice.exit is None:
        return Plan(SpecConfig(method="ar", draft_len=1), asked, choice=choice, observes=True)
    # sized for the cap: its rounds re-plan the length (and the arm) up to it (RoundPlanner),
    # a trial's rounds at the choice's own
    n = int(draft_len) if draft_len is not None else max(1, min(cap, target.policy.max_draft_len))
    return Plan(SpecConfig(method=base, draft_len=n, policy=ExitPolicy.single(choice.exit)), asked, choice=choice,
                observes=True, observed_exit=choice.exit)


@dataclass(frozen=True)
class RoundPlan:
    """One round of a request, re-planned: its draft tokens (0: a target-only step) and the
    exits to draft them from (None: the request's own SpecConfig.policy)."""

    draft_len: int
    policy: ExitPolicy | None = None


class RoundPlanner:
    """Re-plans each round of one request at the load of that round (`next(concurrency)`:
    requests per target actor now, itself included) and teaches the target's goodput policy
    from its rounds (`observe`). Only `auto` requests the goodput policy planned onto an exit
    are re-planned (`replans`); any other plan keeps its draft length (an explicit method
    runs as asked). A request planned to try an arm (Choice.exploring) stays on it for the
    policy's min_samples drafting rounds, run at a load where they may (GoodputPolicy.may_probe;
    else they wait as target-only steps). Any request moves, once, to the arm that is best at
    a round's load once its own is not (GoodputPolicy.round_choice: a shallow arm trusted
    after a lucky trial, or a trial that ended); its draft length never exceeds the plan's
    (its KV was sized for that). Its own rounds' acceptance (`own`, per arm) weighs in its
    re-plans beside the arm's long-run estimate, less the more target-only steps it ran
    since (RequestAcceptance.aged), and its first re-planned round drafts even where that
    estimate says off (round_choice's `own` and `first`)."""

    def __init__(self, target: PlanTarget, plan_: Plan):
        self.target = target
        self.plan = plan_
        self.exit = plan_.observed_exit  # the arm this request's rounds draft from
        self.trial_rounds = 0  # its drafting rounds so far (a trial lasts min_samples of them)
        self.moved = False  # a request moves to another arm once (round_choice)
        self.own: dict[int, RequestAcceptance] = {}  # this request's rounds per arm that drafted them
        self.idle = 0  # its target-only steps since its last drafting round

    @property
    def replans(self) -> bool:
        p = self.plan
        return (self.target.policy is not None and p.choice is not None and p.observed_exit is not None
                and p.spec.method != "ar")

    def next(self, concurrency: int) -> RoundPlan:
        spec, choice, policy = self.plan.spec, self.plan.choice, self.target.policy
        if not self.replans:
            return RoundPlan(spec.draft_len)
        if choice.exploring and choice.exit is not None and self.trial_rounds < policy.min_samples:
            if not policy.may_probe(self.exit, concurrency):
                return RoundPlan(0)  # its trial waits for a load at which it may run
            return RoundPlan(max(1, min(spec.draft_len, choice.draft_len)))
        # a round after target-only steps of its own first feeds their tokens to the draft
        # (priced); a first round's feed of the prompt is what any drafting request pays
        exit, n = policy.round_choice(self.exit, spec.draft_len, concurrency, standby=self.plan.standby,
                                      move=not self.moved, own=self._own_now(), first=self.trial_rounds == 0,
                                      catch_up=self.idle)
        if n > 0 and exit != self.exit:
            self.exit, self.moved = exit, True
        return RoundPlan(n, ExitPolicy.single(self.exit) if self.exit != self.plan.observed_exit else None)

    def _own_now(self) -> dict[int, RequestAcceptance]:
        """Its own rounds per arm, aged by the target-only steps it ran since the last."""
        return {e: a.aged(self.idle) for e, a in self.own.items()}

    def close(self) -> None:
        """The request ended: its own rounds per arm tell the policy what a request may reach
        there (GoodputPolicy.end_request), and an arm (or off) it was planned to try gets
        another trial where this one saw too few rounds (GoodputPolicy.end_trial)."""
        choice, policy = self.plan.choice, self.target.policy
        if policy is not None and self.own:
            policy.end_request(self.own)
        if policy is not None and choice is not None and choice.exploring:
            policy.end_trial(choice.exit)

    def observe(self, info: Mapping) -> None:
        """Teach the target's goodput policy one round (`info`: run_request's on_round dict),
        under the exit that drafted it."""
        observe(self.target, self.plan, info)
        if info["drafted"] == 0:
            self.idle += 1
        else:
            self.own = self._own_now()  # as its re-plan weighed them
            self.idle = 0
            self.trial_rounds += 1
            exits = list(info.get("exits") or ())
            if len(exits) == 1 and exits[0] is not None:
                self.own.setdefault(exits[0], RequestAcceptance()).add(drafted=info["drafted"], accepted=info["accepted"])


def observe(target: PlanTarget, plan_: Plan, info: Mapping) -> None:
    """Teach the target's goodput policy one round of a request planned by `plan`
    (`info`: run_request's on_round dict)."""
    if target.policy is None or not plan_.observes:
        return
    exits = list(info.get("exits") or ())  # the exits that drafted it (a re-plan may move a request's)
    target.policy.observe_round(
        exit=(exits[0] if len(exits) == 1 else plan_.observed_exit) if plan_.spec.method != "ar" else None,
        drafted=info["drafted"],
        accepted=info["accepted"],
        draft_s=info["draft_s"],
        caught_up=info.get("caught_up", 0),
        verify_s=info["verify_s"],
        step_rows=info.get("step_rows", 0),
    )
