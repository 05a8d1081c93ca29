"""Per-request KV caches: one dense, preallocated tensor per layer for keys and one for
values, sized at open (what admission reserved, services/admission.py) or grown by
doubling, plus the hidden state of lazily filled tokens (multi-exit drafts). The runner
(actors/runner.py) owns the forward; this module the memory and its bookkeeping: `filled`
per layer (non-increasing in depth) and the fed tokens, which rollback and fork keep
consistent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


class ContextLengthError(ValueError):
    """The sequence would not fit the model's context window."""


@dataclass
class SequenceState:
    """One request's KV cache on one model. Created by ModelRunner.new_sequence()."""

    keys: list[torch.Tensor]  # per layer [kv_heads, capacity, head_dim]
    values: list[torch.Tensor]
    filled: list[int]  # per layer: positions whose KV exists; non-increasing in layer
    tokens: list[int] = field(default_factory=list)  # fed token ids (len == filled[0])
    hidden: torch.Tensor | None = None  # [capacity, hidden]: state at each lazy token's depth

    @property
    def length(self) -> int:
        """Tokens fed (through layer 0 at least)."""
        return self.filled[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]

    def kv_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)


@dataclass(frozen=True)
class KVLayout:
    """The KV shape of one model (or pipeline stage) on one device: what a sequence holds per
    position, and how sequences are made, grown, forked and cut back."""

    num_layers: int  # layers held here
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype
    device: torch.device
    max_context: int
    keep_hidden: bool  # several exits: keep each lazy token's hidden state

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one position takes here: keys and values of every layer held."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def new_sequence(self, capacity: int = 256) -> SequenceState:
        capacity = max(16, min(int(capacity), self.max_context))
        shape = (self.num_kv_heads, capacity, self.head_dim)
        dev = self.device
        keys = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(self.num_layers)]
        hidden = torch.empty(capacity, self.hidden_size, dtype=self.dtype, device=dev) if self.keep_hidden else None
        return SequenceState(keys=keys, values=values, filled=[0] * self.num_layers, hidden=hidden)

    def ensure_capacity(self, seq: SequenceState, needed: int) -> None:
        if needed > self.max_context:
            raise ContextLengthError(
                f"sequence of {needed} tokens exceeds the model's context of {self.max_context}"
            )
        if needed <= seq.capacity:
            return
        new_cap = min(max(needed, 2 * seq.capacity), self.max_context)
        for lst in (seq.keys, seq.values):
            for i, old in enumerate(lst):
                grown = torch.zeros(self.num_kv_heads, new_cap, self.head_dim, dtype=self.dtype, device=self.device)
                grown[:, : old.shape[1]] = old
                lst[i] = grown
        if seq.hidden is not None:
            grown = torch.empty(new_cap, self.hidden_size, dtype=self.dtype, device=self.device)
            grown[: seq.hidden.shape[0]] = seq.hidden
            seq.hidden = grown

    def fork(self, seq: SequenceState) -> SequenceState:
        """An independent copy of a sequence (SpecTr branches share the prefix this way)."""
        n = seq.length
        child = self.new_sequence(seq.capacity)
        for dst, src in ((child.keys, seq.keys), (child.values, seq.values)):
            for layer, t in enumerate(src):
                dst[layer][:, :n] = t[:, :n]
        child.filled = list(seq.filled)
        child.tokens = list(seq.tokens)
        if seq.hidden is not None and child.hidden is not None:
            child.hidden[:n] = seq.hidden[:n]
        return child

    def release(self, seq: SequenceState) -> None:
        """Free a sequence's KV (local memory is freed with the last reference)."""

    def rollback(self, seq: SequenceState, length: int) -> None:
        """Cut the sequence back to `length` fed tokens (KV past it becomes garbage)."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        length = min(length, seq.length)
        seq.filled = [min(f, length) for f in seq.filled]
        del seq.tokens[length:]

    def truncate_to_common_prefix(self, seq: SequenceState, tokens: Sequence[int]) -> int:
        """Roll back to the longest prefix of `tokens` already fed; returns that length."""
        n = 0
        limit = min(len(tokens), seq.length)
        fed = seq.tokens
        while n < limit and fed[n] == tokens[n]:
            n += 1
        self.rollback(seq, n)
        return n
