"""Prompt-prefix reuse on a target (actors/prefix_cache.py): a prompt that opens with tokens
other prompts shared takes their KV from the cache and prefills the rest, and every logit is
bit for bit what a target without the cache computes.

On the tiny float32 target (torch's attention: chunks are reused whole) and on a tiny bf16
runner on ggml's kernels with the C++ attention (part of a chunk is reused). Controls: an
entry whose keys were changed changes the logits (the comparison sees what came from the
cache); reusing past the runner's rows_kind cut changes them on ggml (the cut is needed)."""

from __future__ import annotations

import pytest
import torch

from tandem.actors.prefix_cache import MIN_REUSE, PrefixCache
from tandem.actors.runner import ModelRunner
from tandem.actors.verifier import Verifier
from tandem.speculation.sampling import SamplingParams

GREEDY = SamplingParams()
SHARED = [(3 * i + 1) % 6 for i in range(10)]  # what the prompts open with (vocab 6)
PROMPTS = [SHARED + [0, 0, 1, 1, 2], SHARED + [5, 4, 3, 2], SHARED + [2, 2, 2, 3, 3, 3]]


def _pair(runner: ModelRunner, chunk: int, max_bytes: int = 1 << 20) -> tuple[Verifier, Verifier]:
    return Verifier(runner, prefill_chunk=chunk, prefix_cache=PrefixCache(max_bytes)), Verifier(runner, prefill_chunk=chunk)


def _same_run(cached: Verifier, plain: Verifier, key: str, prompt: list[int], steps: int = 5) -> bool:
    """Open the prompt on both and decode greedily: the pending logits and every step's
    tokens bit for bit equal."""
    cached.open(key, prompt, sampling=GREEDY)
    plain.open(key, prompt, sampling=GREEDY)
    same = torch.equal(cached.requests[key].pending, plain.requests[key].pending)
    for _ in range(steps):
        same &= cached.verify(key, None).tokens == plain.verify(key, None).tokens
    same &= torch.equal(cached.requests[key].pending, plain.requests[key].pending) if cached.requests[key].pending is not None else True
    return same


def test_shared_prefix_is_reused_whole_chunks_on_torch_attention(tiny_paths, runner_device):
    """Chunks of 4: the third prompt shares 10 tokens with the first two, kept once the
    second was prefilled; torch's attention gives rows that depend on the chunk's size, so 8
    (two whole chunks) are reused, and every logit and token equals the plain target's."""
    runner = ModelRunner(tiny_paths[0], dtype="float32", device=runner_device)
    cached, plain = _pair(runner, chunk=4)
    assert _same_run(cached, plain, "a", PROMPTS[0])
    assert cached.prefix_cache.tokens_reused == 0 and len(cached.prefix_cache) == 0  # nothing shared yet
    assert _same_run(cached, plain, "b", PROMPTS[1])
    assert len(cached.prefix_cache) == 1  # the 10 tokens a and b share
    assert _same_run(cached, plain, "c", PROMPTS[2])
    assert (cached.prefix_cache.hits, cached.prefix_cache.tokens_reused) == (1, 8)
    assert cached.requests["c"].seq.tokens[:10] == SHARED


def test_a_changed_entry_changes_the_logits(tiny_paths, runner_device):
    """Control: the same three prompts with the kept keys changed; the third prompt's logits
    differ from the plain target's, so the equality above saw the cache's KV."""
    runner = ModelRunner(tiny_paths[0], dtype="float32", device=runner_device)
    cached, plain = _pair(runner, chunk=4)
    for key, prompt in zip("ab", PROMPTS[:2]):
        assert _same_run(cached, plain, key, prompt, steps=0)
    (entry,) = cached.prefix_cache._entries.values()
    entry.keys[0] += 0.5
    assert not _same_run(cached, plain, "c", PROMPTS[2], steps=0)
    assert cached.prefix_cache.tokens_reused == 8


def test_a_prompt_sent_again_reuses_only_what_others_share(tiny_paths, runner_device):
    """A prompt is never kept whole for its own repeat: sent again it reuses the 8 positions
    of the prefix it shares with the other prompt; within the budget, least recently used
    first out; a budget of 0 keeps nothing."""
    runner = ModelRunner(tiny_paths[0], dtype="float32", device=runner_device)
    cached, plain = _pair(runner, chunk=4)
    for key, prompt in zip("ab", PROMPTS[:2]):
        _same_run(cached, plain, key, prompt, steps=0)
    assert _same_run(cached, plain, "a2", PROMPTS[0], steps=2)
    assert cached.prefix_cache.tokens_reused == 8
    assert [len(k) for k in cached.prefix_cache._entries] == [10]

    per_token = runner.kv_bytes_per_token
    small = PrefixCache(12 * per_token)  # an entry takes at most half: 6 tokens < MIN_REUSE
    tight = Verifier(runner, prefill_chunk=4, prefix_cache=small)
    for key, prompt in zip("ab", PROMPTS[:2]):
        tight.open(key, prompt, sampling=GREEDY)
    assert len(small) == 0 and small.bytes_used == 0 and 6 < MIN_REUSE

    room = PrefixCache(21 * per_token)  # two 10-token entries; an entry holds 10 at most
    lru = Verifier(runner, prefill_chunk=4, prefix_cache=room)
    other, third = [(5 * i + 2) % 6 for i in range(10)], [(i * i) % 6 for i in range(10)]
    for key, prompt in enumerate([PROMPTS[0], PROMPTS[1], other + [0, 1], other + [1, 1], third + [0, 5], third + [5, 0]]):
        lru.open(str(key), prompt, sampling=GREEDY)
    assert list(room._entries) == [tuple(other), tuple(third)] and room.bytes_used == 20 * per_token

    off = Verifier(runner, prefill_chunk=4, prefix_cache=PrefixCache(0))
    for key, prompt in zip("ab", PROMPTS[:2]):
        off.open(key, prompt, sampling=GREEDY)
    assert len(off.prefix_cache) == 0
    with pytest.raises(ValueError, match="prefix_cache_bytes"):
        PrefixCache(-1)


def test_part_of_a_chunk_is_reused_on_ggml_with_the_cpp_attention(tmp_path, monkeypatch, runner_device):
    """On ggml's bf16 kernels with the C++ attention, a row is computed alike in any block
    that attends in C++ on the same side of quant_max_rows: a 48-token prompt reuses the 30
    tokens it shares with earlier ones, inside its one chunk, and equals the plain target bit
    for bit; one token past the shared ones (a 1-row rest against the whole prompt's 31-row
    chunk) is cut back to rows of the whole chunk's kind. Control: with that cut switched off
    (every block one kind), the 1-row rest runs on the quantized kernels and the logits
    differ."""
    from tests.runtime.conftest import ggml_bf16_runner

    runner = ggml_bf16_runner(tmp_path, monkeypatch, runner_device)
    assert runner.ops.attends(48, runner.head_dim)
    runner.quant_max_rows = 16  # as the 1.5B pack measured its own; dense linears past it
    for lin in runner._quant_linears():
        lin.max_rows = 16
    shared = [(7 * i + 3) % 256 for i in range(30)]
    prompts = [shared + [(11 * i + j) % 256 for i in range(18)] for j in range(3)]
    cached, plain = _pair(runner, chunk=128, max_bytes=8 << 20)
    for key, prompt in zip("ab", prompts[:2]):
        assert _same_run(cached, plain, key, prompt, steps=2)
    assert _same_run(cached, plain, "c", prompts[2], steps=3)
    assert cached.prefix_cache.tokens_reused == 30  # 18 rows left: dense, as the whole 48

    tail = shared + [9]  # the whole is 31 rows (dense): the rest keeps 17 rows, not 1
    assert _same_run(cached, plain, "d", tail, steps=3)
    assert cached.prefix_cache.tokens_reused == 30 + 31 - 17

    monkeypatch.setattr(runner, "rows_kind", lambda rows: ("one kind",))
    blind, plain2 = _pair(runner, chunk=128, max_bytes=8 << 20)
    for key, prompt in zip("ab", prompts[:2]):
        _same_run(blind, plain2, key, prompt, steps=0)
    assert not _same_run(blind, plain2, "d", tail, steps=0)
    assert blind.prefix_cache.tokens_reused == 30


def test_a_target_worker_reports_what_it_reused(tiny_paths):
    """On a TargetWorker (its default cache): the third prompt's prefill span says how many
    positions it reused, and info() counts them; with prefix_cache_bytes=0 nothing is."""
    from tandem.actors.workers import ModelLoad, TargetWorker

    for size, want in ((None, 8), (0, 0)):
        kw = {} if size is None else {"prefix_cache_bytes": size}
        w = TargetWorker(ModelLoad(path=tiny_paths[0], dtype="float32"), prefill_chunk=4, **kw)
        try:
            spans = [w.open(key, prompt, sampling=GREEDY, trace={}).spans[0] for key, prompt in zip("abc", PROMPTS)]
            assert [s.attributes["tandem.prefill.reused_tokens"] for s in spans] == [0, 0, want]
            assert [s.attributes["tandem.prefill.chunks"] for s in spans] == [4, 4, 4 - want // 4]
            info = w.info()
            assert info.get("prefix_tokens_reused", 0) == want and ("prefix_hits" in info) == (size is None)
        finally:
            w.batcher.close()
