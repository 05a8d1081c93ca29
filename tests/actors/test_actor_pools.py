"""Actor pools on a real local Ray cluster with tiny models: losslessness through actors
(sampled and greedy, every method, sharded and unsharded targets), batching of concurrent
requests, placement on the pool resources, and sharded logits against unsharded ones."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from tandem.actors.pipeline import PipelineRunner, TargetShard, split_layers
from tandem.actors.engine import ActorEngine
from tandem.actors.pools import DraftPool, DraftPoolSpec, TargetPool, TargetSpec
from tandem.actors.runner import ModelRunner
from tandem.actors.speculative import SpecConfig
from tandem.actors.workers import ModelLoad
from tandem.speculation.sampling import SamplingParams, logits_to_probs
from tandem.speculation.sorted_policy import ExitPolicy

PROMPT = [0, 1, 2]
METHODS = ["sd", "sorted", "pearl", "spectr"]
TARGETS = ["plain", "sharded"]
N = 2500


@pytest.fixture(scope="module")
def engine(ray_local, tiny_paths):
    target_path, draft_path = tiny_paths
    draft = DraftPool(DraftPoolSpec(load=ModelLoad(path=draft_path, dtype="float32", exits=(2,)), replicas=1, threads=1))
    targets = {
        "plain": TargetPool(TargetSpec(name="plain", load=ModelLoad(path=target_path, dtype="float32"), threads=1)),
        "sharded": TargetPool(TargetSpec(name="sharded", load=ModelLoad(path=target_path, dtype="float32"), shards=2, threads=1)),
    }
    eng = ActorEngine(draft, targets)
    yield eng
    eng.shutdown()


def spec_for(method: str, draft_len: int = 2) -> SpecConfig:
    policy = ExitPolicy(exits=(2, 4), thresholds=(0.45,)) if method == "sorted" else None
    return SpecConfig(method=method, draft_len=draft_len, k=2, policy=policy)


def exact_pairs(runner: ModelRunner, params: SamplingParams) -> np.ndarray:
    vocab = runner.vocab_size
    probs = np.zeros(vocab * vocab)
    for idx, (a, b) in enumerate(itertools.product(range(vocab), repeat=2)):
        s = runner.new_sequence()
        rows = logits_to_probs(runner.extend(s, PROMPT + [a])[len(PROMPT) - 1 :], params)
        probs[idx] = rows[0, a].item() * rows[1, b].item()
    return probs / probs.sum()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("method", METHODS)
def test_sampled_through_actors_follows_target(engine, tiny_paths, method, target, stat_tools):
    """First two tokens (36 categories) over N seeded requests, 8 in flight at once so the
    actors batch them; chi-square at alpha 1e-4 (tests/conftest.py)."""
    params = SamplingParams(temperature=1.0)
    exact = exact_pairs(ModelRunner(tiny_paths[0], dtype="float32"), params)
    vocab = int(round(len(exact) ** 0.5))

    def one(i):
        out = engine.generate(target, PROMPT, spec=spec_for(method), sampling=SamplingParams(temperature=1.0, seed=i), max_new_tokens=2)
        return out.tokens[0] * vocab + out.tokens[1]

    with ThreadPoolExecutor(8) as pool:
        idx = list(pool.map(one, range(N)))
    counts = np.bincount(idx, minlength=len(exact))
    fit = stat_tools.chi_square_test(counts, exact)
    assert fit.passes, f"{method}/{target}: {fit}"


@pytest.mark.parametrize("target", TARGETS)
def test_greedy_through_actors_equals_target_only(engine, target):
    for prompt in ([0, 1, 2], [5, 4, 3, 1]):
        ref = engine.generate(target, prompt, spec=SpecConfig(method="ar"), max_new_tokens=40).tokens
        for method in METHODS:
            for draft_len in (1, 4):
                out = engine.generate(target, prompt, spec=spec_for(method, draft_len), max_new_tokens=40)
                assert out.tokens == ref, (method, draft_len, prompt)


def test_concurrent_requests_are_batched_and_correct(engine):
    ref = engine.generate("plain", [3, 1], spec=SpecConfig(method="ar"), max_new_tokens=30).tokens
    before = engine.targets["plain"].members[0].handle.info.remote()
    import ray

    b0 = ray.get(before)
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: engine.generate("plain", [3, 1], spec=spec_for("pearl", 3), max_new_tokens=30).tokens, range(12)))
    assert all(o == ref for o in outs)
    b1 = ray.get(engine.targets["plain"].members[0].handle.info.remote())
    batches = b1["batches"] - b0["batches"]
    items = b1["batched_items"] - b0["batched_items"]
    assert items > batches, "concurrent verifications should share forwards"
    d = ray.get(engine.draft_pool.members[0].handle.info.remote())
    assert d["batched_items"] > d["batches"]


@pytest.mark.parametrize("grouped", ["1", "0"])
def test_requests_on_one_event_loop_send_their_verify_calls_together(engine, monkeypatch, grouped):
    """The router's way: many requests as tasks on one event loop (agenerate). The verify
    calls one pass of the loop makes go to the target as one verify_many call (actors/
    remote.py _Coalescer), each answered in its own slot: greedy output equals a request
    run alone, for ar and sd, and the target counts fewer actor calls than verifications.
    The control (TANDEM_COALESCE=0) sends each verify alone: no group."""
    import asyncio

    import ray

    monkeypatch.setenv("TANDEM_COALESCE", grouped)
    handle = engine.targets["plain"].members[0].handle
    ref = {m: engine.generate("plain", [3, 1], spec=spec_for(m, 3), max_new_tokens=20).tokens for m in ("ar", "sd")}
    b0 = ray.get(handle.info.remote())

    async def many():
        runs = [engine.agenerate("plain", [3, 1], spec=spec_for(m, 3), max_new_tokens=20) for m in ("ar", "sd") * 4]
        return await asyncio.gather(*runs)

    outs = asyncio.run(many())
    assert [o.tokens for o in outs] == [ref[m] for m in ("ar", "sd") * 4]
    b1 = ray.get(handle.info.remote())
    groups, calls = b1["verify_groups"] - b0["verify_groups"], b1["calls"] - b0["calls"]
    assert calls >= 8 * 10  # every request verified at least ten times (20 tokens, <= 4 a round)
    if grouped == "1":
        assert 0 < groups < calls, (groups, calls)  # some groups held several requests
    else:
        assert groups == 0
    assert all(v == [] for v in engine.live_requests().values())


def test_every_actor_frees_its_requests(engine):
    for target in TARGETS:
        for method in ["ar"] + METHODS:
            engine.generate(target, [1, 2], spec=spec_for(method), max_new_tokens=6)
    live = engine.live_requests()
    assert all(v == [] for v in live.values()), live


def test_pools_sit_on_their_own_resources(engine):
    import ray

    d = ray.get(engine.draft_pool.members[0].handle.info.remote())
    assert d["resources"].get("draft_pool") == 1 and "target_pool" not in d["resources"]
    assert d["threads"] == 1
    t = ray.get(engine.targets["plain"].members[0].handle.info.remote())
    assert t["resources"].get("target_pool") == 1 and "draft_pool" not in t["resources"]
    # where they run, for the router's overlap choice (deploy/serve.py overlap_pays): one node here
    assert d["node_id"] == t["node_id"] == ray.get_runtime_context().get_node_id()
    assert d["node_cpus"] == t["node_cpus"] >= 1
    for shard in engine.targets["sharded"].members[0].shards:
        info = ray.get(shard.info.remote())
        assert info["resources"].get("target_pool") == 1
    layers = [ray.get(s.info.remote())["layers"] for s in engine.targets["sharded"].members[0].shards]
    assert layers == [[0, 1], [1, 2]]


def test_actors_run_on_their_device_under_the_discipline(engine):
    """Every actor's runner sits on the CPU here (device "auto" without a GPU) while the
    threads that run its models have "meta" as their default device (tests/conftest.py), so
    the actor tests above ran under the device discipline; the pipeline shards too (they
    take it in each forward, which Ray runs on its own threads)."""
    import ray

    infos = [ray.get(engine.draft_pool.members[0].handle.info.remote()), ray.get(engine.targets["plain"].members[0].handle.info.remote())]
    infos += [ray.get(s.info.remote()) for s in engine.targets["sharded"].members[0].shards]
    assert [i["device"] for i in infos] == ["cpu"] * len(infos)
    assert [i["default_device"] for i in infos] == ["meta"] * len(infos)  # the shards: as of their last forward
    assert infos[0]["kernel"] == "dense"  # this test's draft is not quantized


def test_unknown_target_is_a_clear_error(engine):
    with pytest.raises(KeyError, match="not served"):
        engine.generate("nope", [1], spec=SpecConfig(method="ar"), max_new_tokens=2)


def test_sharded_logits_equal_unsharded(ray_local, tiny_paths):
    import ray

    path = tiny_paths[1]  # the 4-layer model: 2 stages of 2 layers, and 4 of 1
    full = ModelRunner(path, dtype="float32")
    tokens = [0, 3, 1, 4, 2, 5, 1, 1]
    s = full.new_sequence()
    ref = torch.cat([full.extend(s, tokens[:5]), full.extend(s, tokens[5:])])
    for shards in (2, 4):
        stages = [ray.remote(TargetShard).remote(path, layer_range=r, dtype="float32") for r in split_layers(4, shards)]
        pipe = PipelineRunner(stages, vocab_size=full.vocab_size, max_context=full.max_context)
        seq = pipe.new_sequence()
        out = torch.cat([pipe.extend(seq, tokens[:5]), pipe.extend(seq, tokens[5:])])
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        pipe.rollback(seq, 3)  # lazy rollback: the next forward cuts every stage back
        again = pipe.extend(seq, tokens[3:])
        assert torch.allclose(again, ref[3:], atol=1e-5)
        for st in stages:
            ray.kill(st)


@pytest.mark.parametrize("target", TARGETS)
def test_logprobs_and_penalties_through_actors(engine, tiny_paths, target):
    """Penalized greedy is one output under every method, with the target-only logprobs;
    sampled logprobs equal one full forward. On the sharded target the last pipeline stage
    makes the logits, and still only the logprobs leave the target actor."""
    penalties = {"repetition_penalty": 1.3, "frequency_penalty": 1.0, "presence_penalty": 1.0}
    greedy = SamplingParams(logprobs=2, **penalties)
    ref = engine.generate(target, PROMPT, spec=SpecConfig(method="ar"), sampling=greedy, max_new_tokens=20)
    plain = engine.generate(target, PROMPT, spec=SpecConfig(method="ar"), max_new_tokens=20)
    assert ref.tokens != plain.tokens and plain.logprobs is None
    for method in METHODS:
        out = engine.generate(target, PROMPT, spec=spec_for(method, 3), sampling=greedy, max_new_tokens=20)
        assert out.tokens == ref.tokens, method
        assert max(abs(a.logprob - b.logprob) for a, b in zip(out.logprobs, ref.logprobs)) < 1e-5, method
    sampled = SamplingParams(temperature=1.0, seed=3, logprobs=2, **penalties)
    out = engine.generate(target, PROMPT, spec=spec_for("sd", 3), sampling=sampled, max_new_tokens=20)
    runner = ModelRunner(tiny_paths[0], dtype="float32")
    full = torch.log_softmax(runner.extend(runner.new_sequence(), PROMPT + out.tokens[:-1])[len(PROMPT) - 1 :], dim=-1)
    for i, (t, lp) in enumerate(zip(out.tokens, out.logprobs)):
        assert abs(lp.logprob - full[i, t].item()) < 1e-5, i
        assert [x for x, _ in lp.top] == torch.topk(full[i], 2).indices.tolist(), i


def test_sharded_stages_allocate_the_requests_capacity(ray_local, tiny_paths):
    """Issue 12: each stage allocates a request's KV at the capacity admission reserved for it
    (the Verifier's capacity, as an unsharded target does), so what the stages hold is what
    was reserved. Control: a sequence opened without one starts at its first block + 128 and
    grows by doubling, past the same length's reservation."""
    import ray

    path = tiny_paths[1]
    full = ModelRunner(path, dtype="float32")
    stages = [ray.remote(TargetShard).remote(path, layer_range=r, dtype="float32") for r in split_layers(4, 2)]
    try:
        pipe = PipelineRunner(stages, vocab_size=full.vocab_size, max_context=full.max_context)
        per_token = [ray.get(st.info.remote())["kv_bytes_per_token"] for st in stages]
        capacity = min(300, full.max_context)

        def fill(seq) -> list[int]:
            for start in range(0, capacity, 25):  # decode-sized blocks up to the reserved length
                pipe.extend(seq, [(start + j) % full.vocab_size for j in range(min(25, capacity - start))])
            used = ray.get([st.kv_bytes_used.remote() for st in stages])
            pipe.release(seq)
            deadline = time.monotonic() + 30
            while any(ray.get([st.kv_bytes_used.remote() for st in stages])):
                assert time.monotonic() < deadline, "stages kept the sequence"
                time.sleep(0.05)
            return used

        assert fill(pipe.new_sequence(capacity)) == [capacity * b for b in per_token]
        grown = fill(pipe.new_sequence())  # control: no capacity given
        assert all(g > capacity * b for g, b in zip(grown, per_token)), (grown, per_token)
    finally:
        for st in stages:
            ray.kill(st)
