"""In-process speculative generation: one target and one draft runner in this process, each
served by its own worker thread (torch releases the GIL inside kernels, so the two overlap).

Thread split: sequential methods (ar, sd, sorted, spectr) give each side every thread, since
only one side runs at a time. PEARL runs both at once, so the threads are split between
them; `calibrate_split` measures each candidate split with both sides busy and keeps the
one with the best predicted rate (on 2 cores that is 1 + 1).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tandem.actors.block_costs import measure_block_costs
from tandem.actors.drafter import Drafter
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import GenerationResult, LocalSide, SpecConfig, run_request
from tandem.actors.verifier import Verifier
from tandem.speculation.goodput import PRIOR_ACCEPTANCE, GoodputPolicy, planned_draft_len, round_rate
from tandem.speculation.sampling import SamplingParams
from tandem.speculation.sorted_policy import ExitPolicy

DEFAULT_GAMMA = {"ar": 1, "sd": 6, "sorted": 6, "pearl": 8, "spectr": 4}
PLANNED = ("sd", "sorted")  # methods whose default draft length is planned per target (draft_len)
MAX_PLANNED_DRAFT_LEN = 8
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
            return DEFAULT_GAMMA["pearl"]
        return int(max(2, min(MAX_WINDOW, round(self.target_step_s / self.draft_step_s))))


def available_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


class LocalEngine:
    """Generate with any method on a target and an optional draft, in this process."""

    def __init__(
        self,
        target: ModelRunner,
        draft: ModelRunner | None = None,
        *,
        threads: int | None = None,
        split: ThreadSplit | None = None,
    ):
        self.target = target
        self.draft = draft
        self.threads = threads or available_threads()
        self.verifier = Verifier(target)
        self.drafter = Drafter(draft) if draft is not None else None
        self._split = split
        self._planned_len = DEFAULT_GAMMA["sd"]
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
        """The draft length of a request that names none. sd and sorted: planned for this
        target and draft from the target's verification time per block size and the draft's
        step, measured once on the sides' threads (actors/block_costs.py; a bf16 target
        verifies 8 rows for about the price of one, a 4-bit one does not), with a prior
        acceptance at first, then with the acceptance and times of this engine's own sd rounds
        (the router's goodput model, speculation/goodput.py). PEARL: its thread split's window.
        Others: DEFAULT_GAMMA."""
        if method == "pearl":
            return self.split.window
        if method not in PLANNED or self.drafter is None:
            return DEFAULT_GAMMA.get(method, 4)
        policy = self.length_policy
        full = self.draft.num_layers
        if policy.arms[full].rounds >= policy.min_samples:
            return policy.best_draft_len(full)[0]
        return self._planned_len

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
        k: int = 2,
        stop_ids: Sequence[int] = (),
        on_tokens: Callable[[list[int]], None] | None = None,
        on_logprobs: Callable[[list], None] | None = None,
    ) -> GenerationResult:
        """Generate up to max_new_tokens after `prompt` (token ids) with `method`; with
        sampling.logprobs set, result.logprobs has each token's (on_logprobs streams them)."""
        sampling = sampling or SamplingParams()
        if method != "ar" and self.drafter is None:
            raise ValueError(f"method {method!r} needs a draft model; only 'ar' runs without one")
        on_round = None
        if draft_len is None:
            draft_len = self.default_draft_len(method)
            if method == "sd" and self._length_policy is not None:
                policy_, full = self._length_policy, self.draft.num_layers
                on_round = lambda info: policy_.observe_round(  # noqa: E731 - this engine's rounds teach its length
                    exit=full, drafted=info["drafted"], accepted=info["accepted"], draft_s=info["draft_s"], verify_s=info["verify_s"]
                )
        if method == "sorted" and policy is None:
            raise ValueError("method 'sorted' needs an exit policy (exits and thresholds)")
        spec = SpecConfig(method=method, draft_len=draft_len, policy=policy, k=k)
        if policy is not None and self.drafter is not None:
            self.drafter.check_policy(policy)
        check_context(self.target, len(prompt), max_new_tokens, extra=draft_len + 1)
        target, draft = self._pair("parallel" if method == "pearl" else "sequential")
        return run_request(
            draft=draft,
            target=target,
            request_id=f"local-{next(self._ids)}",
            prompt=prompt,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            spec=spec,
            stop_ids=stop_ids,
            on_tokens=on_tokens,
            on_logprobs=on_logprobs,
            on_round=on_round,
        )


def check_context(runner: ModelRunner, prompt_len: int, max_new_tokens: int, *, extra: int = 0) -> None:
    """Raise a ValueError naming the field when a request cannot fit the context."""
    if prompt_len < 1:
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len >= runner.max_context:
        raise ValueError(f"prompt is {prompt_len} tokens, longer than the model's context of {runner.max_context}")
    if prompt_len + max_new_tokens + extra > runner.max_context:
        raise ValueError(
            f"max_new_tokens: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceed the "
            f"model's context of {runner.max_context}"
        )


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

