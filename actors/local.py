"""In-process speculative generation: one target and one draft runner in this process, each
served by its own worker thread (torch releases the GIL inside kernels, so the two overlap).

Thread split: sequential methods (ar, sd, sorted, spectr) give each side every thread, since
only one side runs at a time. PEARL runs both at once, so the threads are split between
them; `calibrate_split` measures each candidate split with both sides busy and keeps the
one with the best predicted rate (on 2 cores that is 1 + 1).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from tandem.actors.block_costs import measure_block_costs
from tandem.actors.devices import available_threads
from tandem.actors.drafter import Drafter
from tandem.actors.prefix_cache import PREFIX_CACHE_BYTES, PrefixCache
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import GenerationResult, LocalSide, request_steps
from tandem.actors.steps import Steps, drive, drive_async
from tandem.actors.verifier import Verifier
from tandem.speculation.goodput import PRIOR_ACCEPTANCE, GoodputPolicy, planned_draft_len, round_rate
from tandem.speculation.plan import DEFAULT_DRAFT_LEN, DEFAULT_MAX_DRAFT_LEN, Plan, RoundPlan, RoundPlanner, SpecConfig, check_context
from tandem.speculation.plan import plan as plan_request
from tandem.speculation.sampling import SamplingParams
from tandem.speculation.sorted_policy import ExitPolicy

PLANNED = ("sd", "sorted")  # methods whose default draft length is planned per target (draft_len)
MAX_PLANNED_DRAFT_LEN = DEFAULT_MAX_DRAFT_LEN
MAX_WINDOW = 16  # longest PEARL window calibrate_split considers


@dataclass(frozen=True)
class ThreadSplit:
    target: int
    draft: int
    target_step_s: float = 0.0  # measured verify forward (draft_len + 1 tokens) with both busy
    draft_step_s: float = 0.0  # measured one-token draft step with both busy
    window_len: int | None = None  # calibrate_split's choice, priced with the target's cost curve

    @property
    def window(self) -> int:
        """PEARL window: draft tokens per round (calibrated, else those that fit in one
        verification of the measured probe)."""
        if self.window_len is not None:
            return self.window_len
        if self.draft_step_s <= 0:
            return DEFAULT_DRAFT_LEN["pearl"]
        return int(max(2, min(MAX_WINDOW, round(self.target_step_s / self.draft_step_s))))


class LocalEngine:
    """Generate with any method on a target and an optional draft, in this process."""

    def __init__(
        self,
        target: ModelRunner,
        draft: ModelRunner | None = None,
        *,
        threads: int | None = None,
        split: ThreadSplit | None = None,
        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
    ):
        self.target = target
        self.draft = draft
        self.threads = threads or available_threads()
        # prompt prefixes other prompts shared, as on a TargetWorker (actors/prefix_cache.py)
        self.verifier = Verifier(target, prefix_cache=PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None)
        self.drafter = Drafter(draft) if draft is not None else None
        self._split = split
        self._planned_len = DEFAULT_DRAFT_LEN["sd"]
        self._length_policy: GoodputPolicy | None = None
        self._block_costs: list[float] | None = None
        self._sides: dict[str, tuple[LocalSide, LocalSide | None]] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ threads
    def _pair(self, kind: str) -> tuple[LocalSide, LocalSide | None]:
        if kind not in self._sides:
            if kind == "parallel":
                split = self.split
                t, d = split.target, split.draft
            else:
                t = d = self.threads
            target = LocalSide(self.verifier, threads=t, name=f"target-{kind}")
            draft = LocalSide(self.drafter, threads=d, name=f"draft-{kind}") if self.drafter else None
            self._sides[kind] = (target, draft)
        return self._sides[kind]

    @property
    def split(self) -> ThreadSplit:
        if self._split is None:
            self._split = calibrate_split(self.target, self.draft, threads=self.threads, curve=self.block_costs)
        return self._split

    def block_costs(self) -> list[float]:
        """The target's verification time per block of 1..MAX_WINDOW + 1 rows (actors/
        block_costs.py), measured once on the target side's thread; the planned sd length and
        PEARL's window both price with it."""
        if self._block_costs is None:
            target, _ = self._pair("sequential")
            self._block_costs = target.run(lambda: measure_block_costs(self.target, MAX_WINDOW + 1)).result()
        return self._block_costs

    def default_draft_len(self, method: str) -> int:
        """The draft length of a `method` request that names none (the planner's rule on this
        engine's measurements; see plan())."""
        return self.plan(method).spec.draft_len

    def plan(
        self, method: str = "auto", *, draft_len: int | None = None, policy: ExitPolicy | None = None,
        max_draft_len: int | None = None, k: int | None = None,
    ) -> Plan:
        """One request's plan from the planner (speculation/plan.py), with this engine as the
        target: its goodput policy is `length_policy` (sequential rounds of the full draft,
        priced with the target's cost curve), so `auto` picks the full draft's length or
        speculation off, and sd/sorted without a length get the one planned from the cost
        curve, then the one learned from this engine's rounds. PEARL's default window is its
        thread split's. A request naming its length (or an exit policy for sd/pearl) is not
        observed. Nothing is measured for ar/off, spectr, or a request naming its length."""
        has_draft = self.drafter is not None
        learns = has_draft and draft_len is None and method in ("auto", "sd", "sorted")
        learns = learns and not (policy is not None and method in ("sd", "pearl"))
        measured: dict[str, int] = {}
        if learns:
            self.length_policy  # noqa: B018 - measures the cost curve and plans the sd length once
            measured = {"sd": self._planned_len, "sorted": self._planned_len}
        elif has_draft and draft_len is None and method == "pearl":
            measured = {"pearl": self.split.window}
        view = _PlanView(
            name="local", default_method="auto", max_draft_len=DEFAULT_MAX_DRAFT_LEN,
            policy=self._length_policy if learns else None, sorted_policy=policy if method == "sorted" else None,
        )
        p = plan_request(view, method, draft_len=draft_len, max_draft_len=max_draft_len, has_draft=has_draft, draft_lens=measured)
        spec = p.spec
        if policy is not None and spec.method in ("sd", "pearl"):
            spec = replace(spec, policy=policy)  # sd/pearl from the given exit(s)
        if k is not None and spec.method == "spectr":
            spec = replace(spec, k=k)
        return replace(p, spec=spec)

    @property
    def length_policy(self) -> GoodputPolicy:
        if self._length_policy is None:
            _, draft = self._pair("sequential")
            costs = self.block_costs()[: MAX_PLANNED_DRAFT_LEN + 1]
            step = draft.run(lambda: measure_block_costs(self.draft, 1)).result()[0]
            self._planned_len = planned_draft_len(costs, step, max_draft_len=MAX_PLANNED_DRAFT_LEN)
            self._length_policy = GoodputPolicy(
                exits=(self.draft.num_layers,), max_draft_len=MAX_PLANNED_DRAFT_LEN, overlapped=False, block_costs=costs
            )
        return self._length_policy

    def close(self) -> None:
        for target, draft in self._sides.values():
            target.shutdown()
            if draft is not None:
                draft.shutdown()
        self._sides.clear()

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: Sequence[int],
        *,
        method: str = "sd",
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 128,
        draft_len: int | None = None,
        policy: ExitPolicy | None = None,
        k: int | None = None,
        max_draft_len: int | None = None,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[list[int]], None] | None = None,
        on_logprobs: Callable[[list], None] | None = None,
    ) -> GenerationResult:
        """Generate up to max_new_tokens after `prompt` (token ids) with `method` (one of the
        planner's METHODS, or "ar" = "off"), planned by plan(); result.plan is that plan. With
        sampling.logprobs set, result.logprobs has each token's (on_logprobs streams them)."""
        sampling = sampling or SamplingParams()
        if method not in ("ar", "off", "auto") and self.drafter is None:
            raise ValueError(f"method {method!r} needs a draft model; only 'ar' runs without one")
        if method == "sorted" and policy is None:
            raise ValueError("method 'sorted' needs an exit policy (exits and thresholds)")
        p = self.plan(method, draft_len=draft_len, policy=policy, max_draft_len=max_draft_len, k=k)
        view = _PlanView(name="local", default_method="auto", max_draft_len=DEFAULT_MAX_DRAFT_LEN,
                         policy=self._length_policy, sorted_policy=None)
        rounds = RoundPlanner(view, p)  # auto re-plans each round, as the router's requests do
        on_round = rounds.observe if p.observes and self._length_policy is not None else None
        try:
            result = self.run(prompt, spec=p.spec, sampling=sampling, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                              on_tokens=on_tokens, on_logprobs=on_logprobs, on_round=on_round,
                              round_plan=(lambda: rounds.next(1)) if rounds.replans else None)
        finally:
            rounds.close()
        result.plan = p
        return result

    def run(self, prompt: Sequence[int], **kwargs) -> GenerationResult:
        """Run one planned request on this thread: run_steps()'s arguments (no planning, no
        learning: the caller's on_round does that)."""
        return drive(self.run_steps(prompt, **kwargs))

    def run_steps(
        self,
        prompt: Sequence[int],
        *,
        spec: SpecConfig,
        sampling: SamplingParams | None = None,
        max_new_tokens: int = 128,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[list[int]], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
        on_round: Callable[[dict], None] | None = None,
        on_logprobs: Callable[[list], None] | None = None,
        request_id: str | None = None,
        round_plan: Callable[[], RoundPlan] | None = None,
    ) -> Steps:
        """One planned request as a step generator (actors/steps.py; run() drives it here,
        InProcessEngine.agenerate on an event loop); round_plan is the caller's per-round
        re-plan, as request_steps'. The checks run at once."""
        if spec.method != "ar" and self.drafter is None:
            raise ValueError(f"method {spec.method!r} needs a draft model; only 'ar' runs without one")
        if spec.policy is not None and self.drafter is not None:
            self.drafter.check_policy(spec.policy)
        check_context(len(prompt), max_new_tokens, self.target.max_context, draft_len=spec.draft_len if spec.method != "ar" else 0)
        target, draft = self._pair("parallel" if spec.method == "pearl" else "sequential")
        return request_steps(
            draft=draft if spec.method != "ar" else None,
            target=target,
            request_id=request_id or f"local-{next(self._ids)}",
            prompt=prompt,
            sampling=sampling or SamplingParams(),
            max_new_tokens=max_new_tokens,
            spec=spec,
            stop_ids=stop_ids,
            on_tokens=on_tokens,
            should_stop=should_stop,
            on_logprobs=on_logprobs,
            on_round=on_round,
            round_plan=round_plan,
        )


class InProcessEngine:
    """The engine protocol the router runs planned requests on (as actors/engine.py's
    ActorEngine does over the actor pools), over LocalEngines in this process, one per
    target: `tandem generate --local` goes through the same router, planner and request
    validation as the server."""

    def __init__(self, engines: dict[str, LocalEngine]):
        self.engines = engines

    def generate(self, target: str, prompt: Sequence[int], *, tracing=None, **kwargs) -> GenerationResult:
        """ActorEngine.generate's keywords (spec, sampling, max_new_tokens, stop_ids, on_tokens,
        should_stop, on_round, request_id, on_logprobs, round_plan), run by the target's LocalEngine.run;
        tracing (actor call spans) has nothing to trace here."""
        return drive(self._steps(target, prompt, **kwargs))

    async def agenerate(self, target: str, prompt: Sequence[int], *, tracing=None, **kwargs) -> GenerationResult:
        """generate() on the running event loop: the models run on their side threads, the
        request holds none of its own (the router's way, as ActorEngine.agenerate)."""
        return await drive_async(self._steps(target, prompt, **kwargs))

    def _steps(self, target: str, prompt: Sequence[int], **kwargs) -> Steps:
        if target not in self.engines:
            raise KeyError(f"target {target!r} is not served; targets: {', '.join(sorted(self.engines))}")
        return self.engines[target].run_steps(prompt, **kwargs)

    def shutdown(self) -> None:
        for engine in self.engines.values():
            engine.close()


@dataclass
class _PlanView:
    """This engine as the planner's target (speculation/plan.py PlanTarget)."""

    name: str
    default_method: str
    max_draft_len: int
    policy: GoodputPolicy | None
    sorted_policy: ExitPolicy | None


def calibrate_split(
    target: ModelRunner, draft: ModelRunner | None, *, threads: int, curve: Callable[[], Sequence[float]],
    probe_tokens: int = 9, reps: int = 3,
) -> ThreadSplit:
    """Measure each split (t target threads, threads - t draft threads) with both sides busy
    at once, as in PEARL, and keep the best predicted rate with the best window for it:
    rate(w) = E(w) / max(w * draft step, V(w + 1)) at the prior acceptance
    (speculation/goodput.py round_rate), where V(k), the verification of k rows, is the probe
    measured under the split scaled by `curve()`, the target's cost per block size
    (actors/block_costs.py; called only when there is a split to choose): a 4-bit CPU target verifies in tiles of 4 rows, so its window
    stops at a tile's end instead of wherever the probe's time ran out."""
    if draft is None or threads < 2:
        return ThreadSplit(target=max(threads, 1), draft=max(threads, 1))
    from concurrent.futures import ThreadPoolExecutor

    costs = curve()  # the target's time per block of 1..MAX_WINDOW + 1 rows (only its ratios count)
    prompt = list(range(10, 74))
    best: ThreadSplit | None = None
    best_rate = -1.0
    for t_threads in range(threads - 1, 0, -1):
        d_threads = threads - t_threads

        def timed(runner: ModelRunner, n_threads: int, n_tokens: int) -> float:
            torch.set_num_threads(n_threads)
            ids = [t % runner.vocab_size for t in prompt]  # any vocabulary, down to a tiny test model's
            seq = runner.new_sequence(len(ids) + 32)
            runner.extend(seq, ids, all_logits=False)
            times = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                runner.extend(seq, [t % runner.vocab_size for t in range(1, n_tokens + 1)], all_logits=True)
                times.append(time.perf_counter() - t0)
                runner.rollback(seq, len(prompt))
            return sorted(times[1:])[len(times[1:]) // 2]

        with ThreadPoolExecutor(2) as pool:
            ft = pool.submit(timed, target, t_threads, probe_tokens)
            fd = pool.submit(timed, draft, d_threads, 1)
            v, d = ft.result(), fd.result()
        window, rate = pearl_window(costs, probe_rows=probe_tokens, probe_s=v, draft_step_s=d)
        split = ThreadSplit(target=t_threads, draft=d_threads, target_step_s=v, draft_step_s=d, window_len=window)
        if rate > best_rate:
            best, best_rate = split, rate
    assert best is not None
    return best


def pearl_window(curve: Sequence[float], *, probe_rows: int, probe_s: float, draft_step_s: float) -> tuple[int, float]:
    """(window, predicted tokens/s) of PEARL rounds: the window w in 2..MAX_WINDOW with the
    best E(w) / max(w * draft step, V(w + 1)), V(k) = probe_s * curve[k - 1] / curve[probe_rows - 1]."""

    def rate(w: int) -> float:
        verify_s = probe_s * curve[w] / curve[probe_rows - 1]
        return round_rate([PRIOR_ACCEPTANCE] * w, draft_step_s=draft_step_s, verify_s=verify_s, overlapped=True)

    window = max(range(2, MAX_WINDOW + 1), key=rate)
    return window, rate(window)

