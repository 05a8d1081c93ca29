"""DraftWorker and TargetWorker: the plain classes Ray actors wrap (actors/pools.py makes
them remote). Each serves many concurrent requests: calls that arrive while the model is
busy are merged into one batched forward (actors/batching.py).

Both run as threaded Ray actors (max_concurrency > 1), so a call waits in the batcher
instead of blocking the actor; the model itself runs on the batcher's thread(s) with the
configured torch thread count.

(Past ~400 lines: the two workers share the helpers above them and are the whole surface a
Ray actor exposes; split, each would re-import the same dozen names for one class.)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tandem.actors.batching import PREFILL_CHUNK, Cancellations, MicroBatcher, gather_fraction
from tandem.actors.block_costs import measure_batch_costs, measure_block_costs
from tandem.actors.core_turns import node_turns
from tandem.actors.devices import apply_default_device_env, assigned_resources, default_kv_budget, node_placement, return_freed_host_memory, use_threads
from tandem.actors.drafter import DraftBlock, DraftBranches, Drafter
from tandem.actors.prefix_cache import PREFIX_CACHE_BYTES, PrefixCache
from tandem.actors.runner import ModelRunner
from tandem.actors.tracing import Traced, call_record
from tandem.actors.verifier import Verifier, VerifyOutcome, run_steps
from tandem.speculation.sampling import SamplingParams
from tandem.speculation.sorted_policy import ExitPolicy


@dataclass(frozen=True)
class ModelLoad:
    """What a worker loads: a resolved local path (or hub id) and runtime options."""

    path: str
    dtype: str = "bfloat16"
    device: str = "auto"  # actors/devices.py: the GPU Ray gave the actor, else the CPU
    quantize: str | None = None
    exits: tuple[int, ...] = ()
    head_ids: tuple[int, ...] | None = None
    exit_adapters: str | None = None  # folder of trained exit adapters
    # Injected by the composition root (deploy/): turns `path` (e.g. a pack name) into a
    # local folder on the node where the actor runs. None: `path` is used as is.
    resolve: Any = None

    def local_path(self) -> str:
        return self.resolve(self.path) if self.resolve is not None else self.path

    def build(self, *, model=None) -> ModelRunner:
        adapters = None
        exits = tuple(self.exits)
        head_ids = self.head_ids
        restricted = "all"
        if self.exit_adapters:
            from tandem.actors.exit_adapters import load_exit_adapters

            adapters, trained, trained_head = load_exit_adapters(self.exit_adapters, dtype=self.dtype)
            exits = tuple(sorted(set(exits) | set(trained)))
            if head_ids is None and trained_head is not None:
                # the adapters were trained through this frequent-token head; the deepest
                # exit keeps the whole vocabulary
                head_ids, restricted = tuple(trained_head.tolist()), "early"
        runner = ModelRunner(
            self.local_path(),
            dtype=self.dtype,
            device=self.device,
            quantize=self.quantize,
            exits=exits,
            head_ids=head_ids,
            restricted_head=restricted,
            exit_adapters=adapters,
            model=model,
        )
        if self.exit_adapters:
            from tandem.actors.exit_adapters import check_runner_matches

            check_runner_matches(self.exit_adapters, runner)
        return runner


@dataclass
class WorkerStats:
    started: float = field(default_factory=time.time)
    calls: int = 0


class _Worker:
    """What both workers answer besides their model work: cancels and heartbeats."""

    cancelled: Cancellations

    def cancel(self, request_id: str) -> None:
        """Drop the request's queued and running work (see Cancellations); close still frees it."""
        self.cancelled.cancel(request_id)

    def ping(self) -> int:
        """Heartbeat: answered in the actor's control thread group (actors/remote.py,
        CONTROL_GROUP) even while a forward runs and every call thread waits, so a ping
        that times out means a stopped or hung process, not a busy one. A pipeline front
        answers for itself only; each TargetShard answers its own ping."""
        return os.getpid()


class DraftWorker(_Worker):
    """Hosts one (multi-exit) draft and drafts for requests of any target at once."""

    def __init__(
        self, load: ModelLoad, *, threads: int | None = 1, max_batch: int = 16, kv_budget_bytes: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        apply_default_device_env()
        threads = use_threads(threads)  # None: every core of this node it may use
        self.load = load
        self.threads = threads
        self.cancelled = Cancellations()
        self.drafter = Drafter(load.build(), cancelled=self.cancelled, prefill_chunk=prefill_chunk)
        runner = self.drafter.runner
        # its KV budget (the router reserves draft KV against it, services/admission.py)
        self.kv_bytes_per_token = runner.kv_bytes_per_token
        self.kv_budget_bytes = int(kv_budget_bytes) if kv_budget_bytes else default_kv_budget(runner.device)
        self.batcher = MicroBatcher(
            {"draft": self.drafter.draft_batch, "branches": self.drafter.branches_batch, "catch_up": self.drafter.catch_up_batch},
            threads=threads, max_batch=max_batch, name="draft", cancelled=self.cancelled,
            gather=gather_fraction(), live=self.drafter.requests.__contains__,
            turns=node_turns(runner.device.type, threads),
        )
        self.stats = WorkerStats()

    # trace= (every traced method): the request's trace context when it is traced; the
    # answer is then Traced(value, span records) (actors/tracing.py)

    def open(
        self, request_id: str, *, sampling: SamplingParams, capacity: int = 256, trace: dict | None = None, prompt_len: int | None = None
    ) -> None:
        arrived = time.time_ns()
        self.drafter.open(request_id, sampling=sampling, capacity=capacity, prompt_len=prompt_len)
        if trace is not None:
            return Traced(None, [call_record("tandem.actor.draft_open", role="draft", arrived_ns=arrived, timing=None)])
        return None

    def draft(
        self, request_id: str, sequence: Sequence[int], *, draft_len: int, policy: ExitPolicy | None = None, trace: dict | None = None
    ) -> DraftBlock:
        self.stats.calls += 1
        arrived, timing = time.time_ns(), ({} if trace is not None else None)
        sequence = list(sequence)
        self._catch_up(request_id, sequence)
        call = {"request_id": request_id, "sequence": sequence, "draft_len": draft_len, "policy": policy}
        block = self.batcher.submit("draft", call, request_id=request_id, timing=timing).result()
        if trace is None:
            return block
        attrs = {"tandem.draft.draft_len": int(draft_len), "tandem.draft.tokens": len(block.tokens)}
        return Traced(block, [call_record("tandem.actor.draft", role="draft", arrived_ns=arrived, timing=timing, attributes=attrs)])

    def _catch_up(self, request_id: str, sequence: list[int]) -> None:
        """A long backlog (the prompt, at a request's first draft) is fed a chunk per batch,
        so the other requests' drafts run between its chunks instead of waiting for all of it."""
        while self.drafter.unfed(request_id, sequence) > self.drafter.prefill_chunk:
            left = self.batcher.submit("catch_up", {"request_id": request_id, "sequence": sequence}, request_id=request_id).result()
            if isinstance(left, BaseException):
                raise left
            if left <= self.drafter.prefill_chunk:
                return

    def draft_branches(self, request_id: str, sequence: Sequence[int], *, draft_len: int, k: int, trace: dict | None = None) -> DraftBranches:
        self.stats.calls += 1
        arrived, timing = time.time_ns(), ({} if trace is not None else None)
        sequence = list(sequence)
        self._catch_up(request_id, sequence)
        call = {"request_id": request_id, "sequence": sequence, "draft_len": draft_len, "k": k}
        branches = self.batcher.submit("branches", call, request_id=request_id, timing=timing).result()
        if trace is None:
            return branches
        attrs = {"tandem.draft.draft_len": int(draft_len), "tandem.draft.branches": int(k)}
        return Traced(branches, [call_record("tandem.actor.draft", role="draft", arrived_ns=arrived, timing=timing, attributes=attrs)])

    def close(self, request_id: str) -> bool:
        closed = self.drafter.close(request_id)
        return_freed_host_memory()
        return closed


    def live_requests(self) -> list[str]:
        return self.drafter.live_requests()

    def check_policy(self, policy: ExitPolicy) -> None:
        self.drafter.check_policy(policy)

    def info(self) -> dict[str, Any]:
        r = self.drafter.runner
        return {
            "pid": os.getpid(),
            "resources": assigned_resources(),
            **node_placement(),
            "model": self.load.path,
            "exits": list(r.exits),
            "num_layers": r.num_layers,
            "vocab_size": r.vocab_size,
            "quantize": r.quantize,
            "device": str(r.device),
            "default_device": str(self.batcher.default_device),  # its model threads'; "meta" under the test discipline
            "kernel": r.kernel,
            "quant_max_rows": r.quant_max_rows,  # rows up to which its quantized kernels serve a block
            "threads": self.threads,
            "live_requests": len(self.drafter.requests),
            "gathered": self.batcher.gathered,
            "core_turns": self.batcher.turns is not None,
            "batches": self.batcher.batches,
            "batched_items": self.batcher.batched_items,
            "forward_s": r.timings.forward_s,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_budget_bytes": self.kv_budget_bytes,
            "kv_bytes_used": self.kv_bytes_used(),
        }

    def kv_bytes_used(self) -> int:
        """KV bytes the drafter's open requests hold now."""
        return sum(r.seq.kv_bytes() for r in list(self.drafter.requests.values()))


class TargetWorker(_Worker):
    """Hosts one target (or fronts a pipeline of TargetShard actors) and verifies concurrent
    requests in one batched forward."""

    def __init__(
        self,
        load: ModelLoad | None = None,
        *,
        threads: int | None = 1,
        stages: Sequence[Any] | None = None,
        max_batch: int = 16,
        kv_budget_bytes: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache_bytes: int = PREFIX_CACHE_BYTES,
    ):
        apply_default_device_env()
        threads = use_threads(threads)  # None: every core of this node it may use
        self.load = load
        self.threads = threads
        if stages:
            import ray

            from tandem.actors.pipeline import PipelineRunner

            infos = ray.get([s.info.remote() for s in stages])
            first = infos[-1]
            runner = PipelineRunner(stages, vocab_size=first["vocab_size"], max_context=first["max_context"], name=f"t{os.getpid()}")
            workers = len(stages)  # one batch in flight per stage: stages overlap
            # a position takes KV on every stage; the replica holds what its tightest stage does
            self.kv_bytes_per_token = sum(int(i["kv_bytes_per_token"]) for i in infos)
            positions = min(int(i["kv_budget_bytes"]) // int(i["kv_bytes_per_token"]) for i in infos)
            self.kv_budget_bytes = positions * self.kv_bytes_per_token
        else:
            if load is None:
                raise ValueError("TargetWorker needs a model to load or pipeline stages")
            runner = load.build()
            workers = 1
            self.kv_bytes_per_token = runner.kv_bytes_per_token
            self.kv_budget_bytes = int(kv_budget_bytes) if kv_budget_bytes else default_kv_budget(runner.device)
        self.runner = runner
        self.cancelled = Cancellations()
        # prompt prefixes other prompts shared (actors/prefix_cache.py); not on a pipeline,
        # whose stages hold the KV
        cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes and not stages else None
        self.verifier = Verifier(runner, cancelled=self.cancelled, prefill_chunk=prefill_chunk, prefix_cache=cache)
        # one batch kind, "step": verification blocks and prefill chunks queued meanwhile
        # share a forward (chunked prefill: a long prompt never stalls the others' steps)
        self.batcher = MicroBatcher(
            {"step": self._step_batch},
            threads=threads,
            workers=workers,
            max_batch=max_batch,
            name="target",
            cancelled=self.cancelled,
            gather=gather_fraction(), live=self.verifier.requests.__contains__,
            turns=None if stages else node_turns(runner.device.type, threads),
        )
        self.mixed_steps = 0  # forwards that carried both verification blocks and prefill chunks
        self.verify_groups = 0  # verify_many calls (the router's grouped verify calls)
        self.stats = WorkerStats()

    def block_costs(self, max_rows: int) -> list[float]:
        """The target's forward time per verification block of 1..max_rows rows, measured on
        its model thread (actors/block_costs.py); the router's goodput policy prices draft
        lengths with it."""
        return self.batcher.call(lambda: measure_block_costs(self.runner, max_rows)).result()

    def batch_costs(self, block_rows: int, batches: list[int]) -> dict[int, float]:
        """The target's forward time for b sequences of block_rows rows each (b in batches),
        keyed by rows (actors/block_costs.py): what concurrent requests' blocks cost together."""
        return self.batcher.call(lambda: measure_batch_costs(self.runner, block_rows, batches)).result()

    def _step_batch(self, items: list[tuple]) -> list[VerifyOutcome | int | Exception]:
        """items: ("verify", request_id, block, bonus) or ("prefill", request_id); one
        Verifier.step for all. Per-request failures come back in their slots; the batch
        itself never retries, since a forward has already advanced the other requests' caches."""
        verify = [i for i, it in enumerate(items) if it[0] == "verify"]
        prefill = [i for i, it in enumerate(items) if it[0] == "prefill"]
        outcomes, lefts = self.verifier.step(
            [items[i][1] for i in verify],
            [items[i][2] for i in verify],
            bonus=[items[i][3] for i in verify],
            prefills=[items[i][1] for i in prefill],
        )
        if verify and prefill:
            self.mixed_steps += 1
        results: list[VerifyOutcome | int | Exception] = [0] * len(items)
        for i, out in zip(verify, outcomes):
            results[i] = out
        for i, left in zip(prefill, lefts):
            results[i] = left
        return results

    # trace=: as DraftWorker's (actors/tracing.py)

    def open(
        self, request_id: str, prompt: Sequence[int], *, sampling: SamplingParams, trace: dict | None = None,
        prompt_len: int | None = None, capacity: int | None = None,
    ) -> float:
        """Prefill the prompt, a chunk per step, each riding in the forward of whatever
        verification is queued meanwhile; returns the prefill wall time. Cancelled or
        failed: the request is freed and the error raised."""
        arrived, t0 = time.time_ns(), time.perf_counter()
        self.verifier.begin(request_id, list(prompt), sampling=sampling, prompt_len=prompt_len, capacity=capacity)
        first: dict | None = None
        timing: dict | None = None
        chunks = 0
        try:
            left = len(prompt)
            while left:
                timing = {} if trace is not None else None
                left = self.batcher.submit("step", ("prefill", request_id), request_id=request_id, timing=timing).result()
                if isinstance(left, BaseException):
                    raise left
                first = first if first is not None else timing
                chunks += 1
        except BaseException:
            self.verifier.drop(request_id)
            raise
        value = time.perf_counter() - t0
        if trace is None:
            return value
        # one span for the whole prefill: from the first chunk's start to the last one's end
        span = {**(first or {}), "finished_ns": (timing or {}).get("finished_ns")} if first else None
        req = self.verifier.requests.get(request_id)
        attrs = {"tandem.prefill.tokens": len(prompt), "tandem.prefill.chunks": chunks,
                 "tandem.prefill.reused_tokens": req.reused if req is not None else 0}
        return Traced(value, [call_record("tandem.actor.prefill", role="target", arrived_ns=arrived, timing=span, attributes=attrs)])

    def verify(self, request_id: str, block: DraftBlock | None, *, bonus: bool = True, trace: dict | None = None) -> VerifyOutcome:
        (answer,) = self._verify_all([(request_id, block, bonus, trace)])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def steps(
        self, request_id: str, n: int, *, stop_ids: Sequence[int] = (), trace: dict | None = None
    ) -> list[VerifyOutcome] | Traced:
        """Up to n target-only steps of one request in one actor call, one outcome each, as n
        verify(request_id, None) calls would give them: each step is queued through the
        batcher on its own, so other requests' blocks still share its forward, and a cancel
        drops the steps not yet run. It stops after a token in stop_ids. Why: a call costs
        the router and Ray ~2-5 ms a token on the cores the forward runs on (measured on the
        2-core host, stop 48), paid once per n steps here. A failure after the first step
        ends the run early with the steps already committed; the next call meets it again."""
        arrived = time.time_ns()
        records = []

        def step() -> VerifyOutcome:
            nonlocal arrived
            self.stats.calls += 1
            timing = {} if trace is not None else None
            outcome = self.batcher.submit("step", ("verify", request_id, None, True), request_id=request_id, timing=timing).result()
            if trace is not None:
                records.append(self._verify_record(arrived, timing, outcome, None))
                arrived = time.time_ns()
            return outcome

        outcomes = run_steps(step, n, stop_ids)
        return outcomes if trace is None else Traced(outcomes, records)

    def verify_many(self, calls: Sequence[tuple]) -> list[VerifyOutcome | Traced | Exception]:
        """Several requests' verify calls in one actor call (the router groups the calls one
        pass of its event loop makes, actors/remote.py _Coalescer): each (request_id, block,
        bonus, trace) is queued at once, so they share a forward without a gather wait; each
        answer, or its own failure, comes back in its slot, as verify() would give it."""
        self.verify_groups += 1
        return self._verify_all(calls)

    def _verify_all(self, calls: Sequence[tuple]) -> list[VerifyOutcome | Traced | Exception]:
        arrived = time.time_ns()
        queued = []
        for request_id, block, bonus, trace in calls:
            self.stats.calls += 1
            timing = {} if trace is not None else None
            fut = self.batcher.submit("step", ("verify", request_id, block, bonus), request_id=request_id, timing=timing)
            queued.append((fut, timing, trace, block))
        out: list[VerifyOutcome | Traced | Exception] = []
        for fut, timing, trace, block in queued:
            try:
                outcome = fut.result()
            except Exception as exc:  # noqa: BLE001 - this request's failure, in its slot
                out.append(exc)
                continue
            out.append(outcome if trace is None else Traced(outcome, [self._verify_record(arrived, timing, outcome, block)]))
        return out

    def verify_branches(self, request_id: str, branches: DraftBranches, *, trace: dict | None = None) -> VerifyOutcome:
        self.stats.calls += 1
        arrived, timing = time.time_ns(), ({} if trace is not None else None)
        outcome = self.batcher.submit("step", ("verify", request_id, branches, True), request_id=request_id, timing=timing).result()
        if trace is None:
            return outcome
        return Traced(outcome, [self._verify_record(arrived, timing, outcome, None)])

    @staticmethod
    def _verify_record(arrived: int, timing: dict | None, outcome: VerifyOutcome, block: DraftBlock | None):
        attrs = {
            "tandem.verify.drafted": int(getattr(outcome, "drafted", 0)),
            "tandem.verify.accepted": int(getattr(outcome, "accepted_len", 0)),
            "tandem.verify.emitted": len(getattr(outcome, "tokens", ())),
        }
        return call_record("tandem.actor.verify", role="target", arrived_ns=arrived, timing=timing, attributes=attrs)

    def close(self, request_id: str) -> bool:
        closed = self.verifier.close(request_id)
        return_freed_host_memory()
        return closed


    def live_requests(self) -> list[str]:
        return self.verifier.live_requests()

    def tokenizer(self):
        """The target's tokenizer (with its chat template), for the router."""
        if self.load is None:
            import ray

            return ray.get(self.runner.stages[0].tokenizer.remote())
        from tandem.actors.loading import load_tokenizer

        return load_tokenizer(self.load.local_path())

    def eos_ids(self) -> list[int]:
        """End-of-sequence ids from the model's generation config."""
        from tandem.actors.loading import generation_eos_ids

        if self.load is None:
            import ray

            return ray.get(self.runner.stages[0].eos_ids.remote())
        return generation_eos_ids(self.load.local_path())

    def kv_bytes_used(self) -> int:
        """KV cache bytes the live requests' sequences hold here (a pipeline: on its stages)."""
        if self.load is None:
            import ray

            return sum(ray.get([s.kv_bytes_used.remote() for s in self.runner.stages]))
        return sum(r.seq.kv_bytes() for r in list(self.verifier.requests.values()))

    def info(self) -> dict[str, Any]:
        r = self.runner
        timings = getattr(r, "timings", None)
        return {
            "pid": os.getpid(),
            "resources": assigned_resources(),
            **node_placement(),
            "model": self.load.path if self.load else "pipeline",
            "vocab_size": r.vocab_size,
            "max_context": r.max_context,
            "device": str(r.device),
            "default_device": str(self.batcher.default_device),
            "kernel": getattr(r, "kernel", "pipeline"),
            "quant_max_rows": getattr(r, "quant_max_rows", None),
            "threads": self.threads,
            "live_requests": len(self.verifier.requests),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_budget_bytes": self.kv_budget_bytes,
            "kv_bytes_used": self.kv_bytes_used(),
            "batches": self.batcher.batches,
            "batched_items": self.batcher.batched_items,
            "gathered": self.batcher.gathered,  # calls a batch waited for (actors/batching.py gather)
            "core_turns": self.batcher.turns is not None,  # takes turns on the node's cores (actors/core_turns.py)
            "mixed_steps": self.mixed_steps,
            "verify_groups": self.verify_groups,
            "calls": self.stats.calls,  # verify calls, grouped or not
            "forward_s": timings.forward_s if timings else None,
            **(self.verifier.prefix_cache.stats() if self.verifier.prefix_cache is not None else {}),
        }
