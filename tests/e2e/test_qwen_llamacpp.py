"""llama.cpp's llama-server as the benchmark's peer, for real (bench/llama_peer.py) on the 0.5B
pack's own GGUF: it runs the same model on the same token ids as tandem's 4-bit pack target,
so their greedy outputs agree except at a near-tie of tandem's logits (llama.cpp rounds its
activations to 8 bits; tandem's int4 kernel does not). llamacpp-spec (the same pack drafting
for itself) runs too. Skipped where no llama-server is built (`make peer`)."""

from __future__ import annotations

import pytest

from tandem.actors.runner import ModelRunner
from tandem.bench.llama_peer import LlamaServer, llamacpp_binary
from tests.e2e.conftest import DRAFT, code_prompts

pytestmark = pytest.mark.slow

BINARY = llamacpp_binary(None)
# A departure where tandem's top-1 leads its top-2 by more than this is not rounding: it is a
# different model, tokenization or prompt. bf16 logits of the 0.5B step by 0.125 at these
# magnitudes; two such steps of disagreement are a near-tie, a whole logit is not.
NEAR_TIE = 0.5


@pytest.mark.skipif(BINARY is None, reason="no llama-server: `make peer` builds one (or set $TANDEM_LLAMACPP_BIN)")
def test_llamacpp_runs_the_same_model_as_the_pack_target(pack_paths, qwen_tokenizer):
    from tandem.deploy.pack_grid import pack_grid_file

    pack_grid_file(DRAFT)
    runner = ModelRunner(pack_paths["draft"], dtype="bfloat16", quantize="pack")
    checked = 0
    with LlamaServer(BINARY, DRAFT, threads=2) as ar, LlamaServer(BINARY, DRAFT, threads=2, draft=DRAFT) as spec:
        for messages in code_prompts(2):
            ids = qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            out = ar.generate(ids, max_new_tokens=24)
            assert 0 < len(out) <= 24
            assert spec.generate(ids, max_new_tokens=24)[:1] == out[:1]
            seq = runner.new_sequence(len(ids) + 32)
            logits = runner.prefill(seq, ids)
            for tok in out:
                top = logits.topk(2)
                if int(top.indices[0]) != tok:
                    margin = float(top.values[0] - top.values[1])
                    assert margin <= NEAR_TIE, f"llama.cpp chose {tok}, tandem {int(top.indices[0])} by {margin:.3f}"
                    break
                checked += 1
                logits = runner.extend(seq, [tok], all_logits=False)[-1]
    assert checked >= 8  # they agree on most of it, or the comparison above ran on nothing


@pytest.mark.skipif(BINARY is None, reason="no llama-server: `make peer` builds one (or set $TANDEM_LLAMACPP_BIN)")
def test_llamacpp_streams_and_serves_requests_at_once(qwen_tokenizer):
    """`tandem bench --via grpc --llamacpp` streams from llama-server with a slot per request
    in flight: a streamed request gives the tokens of the same request unstreamed, and two
    at once on two slots each finish with their own (greedy, so the same as alone, but for a
    near-tie a batched forward rounds differently: at least their first tokens agree)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [qwen_tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for m in code_prompts(2)]
    with LlamaServer(BINARY, DRAFT, threads=2, parallel=2) as server:
        alone = [server.generate(ids, max_new_tokens=16) for ids in prompts]
        streamed = [sum(server.generate_stream(prompts[0], max_new_tokens=16), [])]
        assert streamed[0] == alone[0] and 0 < len(alone[0]) <= 16
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda ids: sum(server.generate_stream(ids, max_new_tokens=16), []), prompts))
    assert [b[:2] for b in both] == [a[:2] for a in alone]
    assert alone[0] != alone[1]  # two prompts, two answers: neither got the other's
    # the in-process bench's peer at C in flight (`--methods llamacpp-ar --concurrency 2`)
    from tandem.bench.bench import run_llama
    from tandem.speculation.sampling import SamplingParams

    run = run_llama("llamacpp-ar", binary=BINARY, pack=DRAFT, draft=None, prompts_ids=prompts, max_new_tokens=8,
                    sampling=SamplingParams(temperature=0.0), threads=2, progress=lambda method: None, concurrency=2)
    assert all(0 < len(o) <= 8 for o in run.outputs) and [o[:2] for o in run.outputs] == [a[:2] for a in alone]
    conc = run.extra["concurrent"]
    assert (conc["concurrency"], conc["requests"]) == (2, 4) and conc["aggregate_tokens_per_s"] > 0
