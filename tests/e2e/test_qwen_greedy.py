"""Greedy fidelity on the real Qwen2.5-Coder pair in float32, in one process: every method
reproduces target-only greedy output token for token (2 code prompts x 40 tokens), and
target-only greedy equals transformers' own greedy generate. KV rollback then extend gives
the logits of a fresh prefill."""

from __future__ import annotations

import pytest
import torch

from tandem.actors.local import LocalEngine, ThreadSplit
from tandem.actors.loading import generation_eos_ids, load_causal_lm
from tandem.actors.runner import ModelRunner
from tandem.speculation.sorted_policy import ExitPolicy
from tests.e2e.conftest import code_prompts

pytestmark = pytest.mark.slow
N_TOKENS = 40  # x 2 prompts: several rounds of every method


@pytest.fixture(scope="module")
def setup(pack_paths, qwen_tokenizer):
    hf = load_causal_lm(pack_paths["target"], torch.float32).eval()
    target = ModelRunner(pack_paths["target"], dtype="float32", model=hf)
    draft = ModelRunner(pack_paths["draft"], dtype="float32", quantize="int4", exits=(12,))
    prompts = [
        qwen_tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for m in code_prompts(2)
    ]
    engine = LocalEngine(target, draft, threads=2, split=ThreadSplit(target=1, draft=1))
    yield hf, engine, prompts, generation_eos_ids(pack_paths["target"])
    engine.close()


@pytest.fixture(scope="module")
def reference(setup):
    _, engine, prompts, eos = setup
    return [engine.generate(p, method="ar", max_new_tokens=N_TOKENS, stop_ids=eos).tokens for p in prompts]


def test_target_only_equals_transformers_greedy(setup, reference):
    hf, _, prompts, eos = setup
    torch.set_num_threads(2)
    for p, ref in zip(prompts, reference):
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=eos)
        assert out[0, len(p) :].tolist() == ref


@pytest.mark.parametrize("method", ["sd", "sorted", "pearl", "spectr"])
def test_every_method_equals_target_only(setup, reference, method):
    _, engine, prompts, eos = setup
    policy = ExitPolicy(exits=(12, 24), thresholds=(0.9,)) if method == "sorted" else None
    for p, ref in zip(prompts, reference):
        out = engine.generate(p, method=method, max_new_tokens=N_TOKENS, stop_ids=eos, policy=policy, draft_len=5, k=2)
        assert out.tokens == ref, method
        assert len(ref) == N_TOKENS or ref[-1] in eos
        if method != "sorted":
            assert out.stats.mean_accepted_len > 1.5  # the real pair agrees on code


def test_rollback_then_extend_equals_fresh_prefill_on_the_real_model(pack_paths):
    r = ModelRunner(pack_paths["draft"], dtype="float32")
    tokens = list(range(1000, 1040))
    s = r.new_sequence()
    full = r.extend(s, tokens)
    r.rollback(s, 17)
    r.extend(s, [5, 6, 7, 8])  # a rejected continuation
    r.rollback(s, 17)
    again = r.extend(s, tokens[17:])
    assert torch.allclose(again, full[17:], atol=1e-3, rtol=1e-4)
    fresh = r.extend(r.new_sequence(), tokens)
    assert torch.allclose(fresh, full, atol=1e-3, rtol=1e-4)
