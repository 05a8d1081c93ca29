"""Prompt-prefix KV reuse on a target (automatic prefix caching, as vLLM's and llama.cpp's
servers have it): a prompt that opens with tokens earlier prompts shared takes their keys and
values from a copy kept here and prefills only the rest. Chat prompts share their template's
system turn: 24 of the ~48 tokens of a code_dev prompt on the Qwen packs.

What is kept: once a prompt is prefilled, the longest prefix it shares with another of the
last RECENT_PROMPTS prompts (one of other tokens, not a copy of itself): a template, a
few-shot preamble, never one prompt whole, so a request sent again reuses what it shares with
others and not its own earlier copy. Copies go least recently used first, within `max_bytes`
per target actor (the target's `prefix_cache_bytes`, PREFIX_CACHE_BYTES by default; 0 turns
reuse off), beside the KV budget that admission counts.

Reuse changes no output: the verifier keeps the prompt's chunk boundaries and cuts a reused
prefix back until every row, reused or still to compute, comes from the kind of forward
(`runner.rows_kind`, actors/runner.py) it would have come from without reuse; then it is bit
for bit the same (tests/runtime/test_prefix_cache.py). On the packs' CPU runners every prefill
chunk attends in C++ (actors/layer_ops.py), so that is all a prompt shares as long as the rest
of its chunk stays on the same side of the runner's quant_max_rows; on torch's attention
(other runners), whole chunks only (its rows depend on the block's size). Forwards that mix
several requests' rows were never bit for bit the same as alone; reuse adds nothing to that.

Reuse is by tokens alone, whoever sent them: a client's first token comes sooner when other
prompts shared its opening before, a timing signal across clients; set `prefix_cache_bytes: 0`
where that matters."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from os.path import commonprefix
from typing import Sequence

import torch

from tandem.actors.kv_cache import SequenceState

PREFIX_CACHE_BYTES = 64 << 20  # per target actor: ~2,300 positions of the 1.5B pack's KV
MIN_REUSE = 8  # fewer shared tokens are not worth a lookup's copy
RECENT_PROMPTS = 32  # prompts a new one is compared with for what they share


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    prompt_len: int  # tokens of the prompt it was prefilled as (its chunks' rows), >= len(tokens)
    keys: list[torch.Tensor]  # per layer [kv_heads, len(tokens), head_dim]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixCache:
    """Copies of prompts' KV on one runner, by their tokens. Thread-safe: a target actor opens
    requests on its call threads while its batch thread finishes prefills."""

    def __init__(self, max_bytes: int = PREFIX_CACHE_BYTES):
        if max_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        # recent prompts: their first tokens (as many as an entry may hold) and the whole's hash
        self._seen: deque[tuple[tuple[int, ...], int]] = deque(maxlen=RECENT_PROMPTS)
        self.bytes_used = 0
        self.hits = 0  # prompts that reused a prefix
        self.tokens_reused = 0  # positions taken from here instead of computed
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, prompt: Sequence[int]) -> tuple[_Entry | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that prefix's length."""
        best, best_n = None, 0
        prompt = tuple(int(t) for t in prompt)  # entries' tokens are tuples: compared as they are
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            n = len(commonprefix([entry.tokens, prompt]))
            if n > best_n:
                best, best_n = entry, n
        return best, best_n

    def fill(self, seq: SequenceState, entry: _Entry, n: int) -> None:
        """Give a new, empty sequence the entry's first n positions."""
        if seq.length or n > len(entry.tokens) or n > seq.capacity:
            raise ValueError(f"cannot reuse {n} positions in a sequence of {seq.length} fed and {seq.capacity} room")
        for dst, src in ((seq.keys, entry.keys), (seq.values, entry.values)):  # an entry is never changed
            for layer, t in enumerate(src):
                dst[layer][:, :n] = t[:, :n]
        seq.filled = [n] * len(seq.filled)
        seq.tokens = list(entry.tokens[:n])
        with self._lock:
            if entry.tokens in self._entries:
                self._entries.move_to_end(entry.tokens)
            self.hits += 1
            self.tokens_reused += n

    def keep(self, seq: SequenceState, prompt: Sequence[int], bytes_per_token: int) -> None:
        """After a prompt is prefilled: remember its tokens, and copy in the KV of the longest
        prefix it shares with another recent prompt (not one of the same tokens), unless an
        entry already holds it; entries it extends go, then the least recently used ones
        until it fits. What different prompts share is kept (a template's system turn, a
        few-shot preamble), not any one prompt whole: a request sent again reuses what it
        shares with others, never its own earlier copy, so no entry is only one client's."""
        if self.max_bytes <= 0 or seq.hidden is not None:  # multi-exit sequences keep lazy state
            return
        with self._lock:
            self._keep(seq, prompt, bytes_per_token)

    def _keep(self, seq: SequenceState, prompt: Sequence[int], bytes_per_token: int) -> None:
        n = min(len(prompt), seq.length, min(seq.filled), self.max_bytes // 2 // max(1, bytes_per_token))
        whole = hash(tuple(int(t) for t in prompt))  # tells a copy of this prompt from one cut at n
        tokens = tuple(int(t) for t in prompt[:n])
        shared = max((len(commonprefix([seen, tokens])) for seen, h in self._seen if h != whole), default=0)
        self._seen = deque(((s, h) for s, h in self._seen if h != whole), maxlen=RECENT_PROMPTS)
        self._seen.append((tokens, whole))
        if shared < MIN_REUSE:
            return
        key = tokens[:shared]
        for held in list(self._entries):
            if held[:shared] == key:  # held already (as itself or as the start of a longer one)
                self._entries.move_to_end(held)
                return
            if key[: len(held)] == held:  # the new one extends it
                self._drop(held)
        entry = _Entry(key, len(prompt), [k[:, :shared].clone() for k in seq.keys], [v[:, :shared].clone() for v in seq.values])
        while self._entries and self.bytes_used + entry.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = entry
        self.bytes_used += entry.nbytes

    def clear(self) -> None:
        """Forget every prompt, entry and count (a benchmark between methods that see the same prompts)."""
        with self._lock:
            self._entries.clear()
            self._seen.clear()
            self.bytes_used = self.hits = self.tokens_reused = 0

    def _drop(self, key: tuple[int, ...]) -> None:
        self.bytes_used -= self._entries.pop(key).nbytes

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_bytes": self.max_bytes, "prefix_cache_bytes_used": self.bytes_used,
                "prefix_cache_entries": len(self), "prefix_hits": self.hits, "prefix_tokens_reused": self.tokens_reused}
