"""A target split by layer ranges over several actors (pipeline stages).

`PipelineRunner` looks like a ModelRunner to the Verifier: sequences are keys into each
stage's own KV caches, a forward hands hidden states from stage to stage as Ray object
references (the front never fetches them), and only the last stage's logits come back.
Rollback is lazy: each forward carries the start position, and a stage first cuts its cache
back to it. Calls for different requests pipeline naturally: a stage actor serves one call
at a time, so while stage 2 runs request A, stage 1 already runs request B.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tandem.actors.devices import apply_default_device_env, assigned_resources, default_kv_budget, return_freed_host_memory, use_threads
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import RequestStateLostError


@dataclass
class RemoteSequence:
    """A request's KV spread over the stages: its key there and the committed length."""

    key: str
    length: int = 0
    tokens: list[int] = field(default_factory=list)
    capacity: int = 256  # KV positions each stage allocates for it at its first forward


class TargetShard:
    """One pipeline stage: layers [lo, hi) of a target and a KV cache per sequence key."""

    def __init__(
        self,
        model_path: str,
        *,
        layer_range: tuple[int, int] | None = None,
        stage: tuple[int, int] | None = None,
        dtype: str = "bfloat16",
        device: str = "auto",
        threads: int | None = None,
        resolve=None,
        kv_budget_bytes: int | None = None,
    ):
        """Give either layer_range=(lo, hi) or stage=(index, count): stage `index` of `count`
        near-equal contiguous ranges (worked out here, where the model files are)."""
        apply_default_device_env()
        threads = use_threads(threads)  # None: every core of this node it may use
        self.threads = threads
        self.model_path = resolve(model_path) if resolve is not None else model_path
        if layer_range is None:
            if stage is None:
                raise ValueError("TargetShard needs layer_range or stage")
            from transformers import AutoConfig

            total = int(AutoConfig.from_pretrained(self.model_path).num_hidden_layers)
            layer_range = split_layers(total, stage[1])[stage[0]]
        self.runner = ModelRunner(self.model_path, dtype=dtype, device=device, layer_range=tuple(layer_range))
        self.sequences: dict[str, Any] = {}
        self.kv_budget_bytes = int(kv_budget_bytes) if kv_budget_bytes else default_kv_budget(self.runner.device)

    def forward(
        self, keys: Sequence[str], starts: Sequence[int], inputs: Sequence, capacities: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """capacities: per sequence, the KV positions to allocate at its first forward (what
        admission reserved for the request, as an unsharded target allocates), else its first
        block + 128, grown on demand."""
        self.default_device = apply_default_device_env()  # Ray runs this on its own threads
        if self.threads:
            torch.set_num_threads(self.threads)
        seqs = []
        for i, (key, start, x) in enumerate(zip(keys, starts, inputs)):
            seq = self.sequences.get(key)
            if seq is None:
                if start > 0:
                    # this stage lost the sequence (it restarted): the request must be
                    # re-prefilled elsewhere, like a restarted target
                    raise RequestStateLostError(f"sequence {key!r} is not held by this stage (restarted?)")
                capacity = max(int(capacities[i]), len(x)) if capacities else len(x) + 128
                seq = self.sequences[key] = self.runner.new_sequence(capacity)
            seqs.append(seq)
        # hidden states and logits leave the stage on the CPU (the next stage or the front
        # may sit on another node, or have no GPU)
        return [t.cpu() for t in self.runner.forward_stage(seqs, list(starts), list(inputs))]

    def fork(self, key: str, new_key: str, length: int) -> None:
        seq = self.sequences[key]
        self.runner.rollback(seq, length)
        self.sequences[new_key] = self.runner.fork(seq)

    def release(self, keys: Sequence[str]) -> int:
        released = sum(self.sequences.pop(k, None) is not None for k in keys)
        return_freed_host_memory()
        return released

    def ping(self) -> int:
        """Heartbeat (see DraftWorker.ping)."""
        import os

        return os.getpid()

    def live_sequences(self) -> list[str]:
        return list(self.sequences)

    def kv_bytes_used(self) -> int:
        return sum(s.kv_bytes() for s in list(self.sequences.values()))

    def tokenizer(self):
        from tandem.actors.loading import load_tokenizer

        return load_tokenizer(self.model_path)

    def eos_ids(self) -> list[int]:
        from tandem.actors.loading import generation_eos_ids

        return generation_eos_ids(self.model_path)

    def info(self) -> dict:
        r = self.runner
        import os

        return {"pid": os.getpid(), "resources": assigned_resources(), "device": str(r.device), "default_device": str(getattr(self, "default_device", None)), "layers": [r.layer_lo, r.layer_hi], "total_layers": r.total_layers, "vocab_size": r.vocab_size, "max_context": r.max_context,
                "kv_bytes_per_token": r.kv_bytes_per_token, "kv_budget_bytes": self.kv_budget_bytes}


def split_layers(total: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges of near-equal size."""
    if not 1 <= shards <= total:
        raise ValueError(f"shards must be in 1..{total}, got {shards}")
    bounds = [round(i * total / shards) for i in range(shards + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(shards)]


class PipelineRunner:
    """The runner interface the Verifier needs, over TargetShard actors."""

    def __init__(self, stages: Sequence[Any], *, vocab_size: int, max_context: int, name: str = "pipe"):
        import ray

        self._ray = ray
        self.device = torch.device("cpu")  # logits arrive from the last stage on the CPU
        self.stages = list(stages)
        self.vocab_size = vocab_size
        self.max_context = max_context
        self._ids = itertools.count()
        self._name = name

    def new_sequence(self, capacity: int = 256) -> RemoteSequence:
        """A sequence whose stages allocate `capacity` positions at its first forward."""
        return RemoteSequence(key=f"{self._name}-{next(self._ids)}", capacity=int(capacity))

    @staticmethod
    def forward_rows(lengths: Sequence[int]) -> int:
        """Rows a batched forward over blocks of these lengths computes on each stage: their
        total (the stages' runners pack rows of different lengths; ModelRunner.forward_rows)."""
        return sum(int(n) for n in lengths)

    def extend_batch(
        self, seqs: Sequence[RemoteSequence], blocks: Sequence[Sequence[int]], *, all_logits: bool | Sequence[bool] = True
    ) -> list[torch.Tensor]:
        for s, b in zip(seqs, blocks):
            if s.length + len(b) > self.max_context:
                from tandem.actors.kv_cache import ContextLengthError

                raise ContextLengthError(f"sequence of {s.length + len(b)} tokens exceeds the model's context of {self.max_context}")
        keys = [s.key for s in seqs]
        starts = [s.length for s in seqs]
        capacities = [s.capacity for s in seqs]
        ref = self.stages[0].forward.remote(keys, starts, [list(b) for b in blocks], capacities)
        for stage in self.stages[1:]:
            ref = stage.forward.remote(keys, starts, ref, capacities)  # hidden states go stage to stage
        logits = self._ray.get(ref)
        for s, b in zip(seqs, blocks):
            s.length += len(b)
            s.tokens.extend(int(t) for t in b)
        flags = [all_logits] * len(logits) if isinstance(all_logits, bool) else list(all_logits)
        return [lg if every_row else lg[-1:] for lg, every_row in zip(logits, flags)]

    def extend(self, seq: RemoteSequence, tokens: Sequence[int], *, all_logits: bool = True) -> torch.Tensor:
        return self.extend_batch([seq], [tokens], all_logits=all_logits)[0]

    def prefill(self, seq: RemoteSequence, tokens: Sequence[int]) -> torch.Tensor:
        if len(tokens) == 0:
            raise ValueError("prompt must hold at least one token")
        return self.extend(seq, tokens, all_logits=False)[-1]

    def rollback(self, seq: RemoteSequence, length: int) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        seq.length = min(seq.length, length)  # the stages cut back on the next forward
        del seq.tokens[seq.length :]

    def fork(self, seq: RemoteSequence) -> RemoteSequence:
        child = RemoteSequence(key=f"{self._name}-{next(self._ids)}", length=seq.length, tokens=list(seq.tokens), capacity=seq.capacity)
        self._ray.get([st.fork.remote(seq.key, child.key, seq.length) for st in self.stages])
        return child

    def release(self, seq: RemoteSequence) -> None:
        for st in self.stages:
            st.release.remote([seq.key])  # fire and forget: freeing never blocks a request
