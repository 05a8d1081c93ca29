"""Lossless through the distributed path on the real Qwen2.5-Coder models in float32:
- actor pools (draft actor + a target replica as a 2-stage pipeline): every method
  reproduces target-only greedy output (the unsharded actor path is the gRPC test's);
- the gRPC server with both default targets (1.5B and 0.5B) behind one endpoint and the
  shared int4 0.5B draft: greedy output over the wire equals speculation-off output."""

from __future__ import annotations

import pytest

from tandem.actors.engine import ActorEngine
from tandem.actors.pools import DraftPool, DraftPoolSpec, TargetPool, TargetSpec
from tandem.actors.loading import generation_eos_ids
from tandem.actors.speculative import SpecConfig
from tandem.actors.workers import ModelLoad
from tandem.speculation.sorted_policy import ExitPolicy
from tests.e2e.conftest import DRAFT, TARGET, code_prompts

pytestmark = pytest.mark.slow
N_TOKENS = 24


@pytest.fixture(scope="module")
def prompts(qwen_tokenizer):
    return [
        qwen_tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for m in code_prompts(1)
    ]


@pytest.mark.parametrize("shards", [2])
def test_every_method_through_actors_equals_target_only(ray_local, pack_paths, prompts, shards):
    draft = DraftPool(
        DraftPoolSpec(load=ModelLoad(path=pack_paths["draft"], dtype="float32", quantize="int4", exits=(12,)), threads=1)
    )
    target = TargetPool(TargetSpec(name="t", load=ModelLoad(path=pack_paths["target"], dtype="float32"), shards=shards, threads=1))
    engine = ActorEngine(draft, {"t": target})
    eos = generation_eos_ids(pack_paths["target"])
    try:
        for p in prompts:
            ref = engine.generate("t", p, spec=SpecConfig(method="ar"), max_new_tokens=N_TOKENS, stop_ids=eos).tokens
            for method in ("sd", "sorted", "pearl", "spectr"):
                policy = ExitPolicy(exits=(12, 24), thresholds=(0.9,)) if method == "sorted" else None
                out = engine.generate("t", p, spec=SpecConfig(method=method, draft_len=5, policy=policy), max_new_tokens=N_TOKENS, stop_ids=eos)
                assert out.tokens == ref, (method, shards)
        assert all(v == [] for v in engine.live_requests().values())
    finally:
        engine.shutdown()


def test_greedy_over_grpc_equals_target_only_for_both_targets(ray_local):
    from tandem.services.client import TandemClient
    from tests.service.conftest import ServerThread

    cfg = {
        "server": {"host": "127.0.0.1", "port": 0, "metrics_port": None},
        "draft_pool": {"model": DRAFT, "dtype": "float32", "quantize": "int4"},
        "targets": [{"name": TARGET, "dtype": "float32"}, {"name": DRAFT, "dtype": "float32"}],
    }
    from tandem.deploy.packs import resolve_model_path

    srv = ServerThread(cfg, resolve=resolve_model_path)
    try:
        with TandemClient(srv.address) as c:
            for target in (TARGET, DRAFT):
                for messages in code_prompts(1):
                    ref = c.generate(target=target, messages=messages, max_new_tokens=N_TOKENS, method="off")
                    for method in ("auto", "pearl", "sd"):
                        out = c.generate(target=target, messages=messages, max_new_tokens=N_TOKENS, method=method)
                        assert out.token_ids == ref.token_ids, (target, method)
                        assert out.text == ref.text
    finally:
        srv.stop()
