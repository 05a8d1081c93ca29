"""Token-id input, min_p and penalties, logprobs and the echoed seed through a real gRPC
server (grpc.aio on a loopback port, actor pools on a local Ray, tiny models), plus the
client's request building and chunk conversion for them."""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from tandem.actors.loading import load_tokenizer
from tandem.actors.runner import ModelRunner
from tandem.services.client import (
    TandemClient,
    build_generate_request,
    chunk_from_proto,
    collect_chunks,
)
from tandem.v1 import tandem_pb2 as pb
from tandem.v1 import tandem_pb2_grpc as pb_grpc

PROMPT = "def x return y"
PENALTIES = {"repetition_penalty": 1.3, "frequency_penalty": 0.8, "presence_penalty": 0.5}


@pytest.fixture(scope="module")
def prompt_ids(tiny_service_models):
    return list(load_tokenizer(tiny_service_models["small"])(PROMPT, add_special_tokens=True)["input_ids"])


def full_forward_logprobs(model_path: str, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), vocab]: the target's log_softmax at each output position, one forward."""
    runner = ModelRunner(model_path, dtype="float32")
    logits = runner.extend(runner.new_sequence(), prompt + output[:-1])
    return torch.log_softmax(logits[len(prompt) - 1 :], dim=-1)


def test_logprobs_over_grpc_are_the_targets(server, tiny_service_models, prompt_ids):
    """Sampled with penalties and min_p under sd, from token ids: every streamed token's
    logprob and top 3 equal one full forward of the target over prompt + output."""
    with TandemClient(server.address) as c:
        chunks = list(
            c.generate_stream(
                target="small", prompt_token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, method="sd",
                temperature=0.9, min_p=0.05, seed=5, logprobs=3, **PENALTIES,
            )
        )
    for ch in chunks:
        assert [lp.token_id for lp in ch.logprobs] == ch.token_ids  # aligned within every message
    result = collect_chunks(chunks)
    assert len(result.token_ids) == 24 and result.stats["method"] == "sd" and result.seed == 5
    ref = full_forward_logprobs(tiny_service_models["small"], prompt_ids, result.token_ids)
    for i, (t, lp) in enumerate(zip(result.token_ids, result.logprobs)):
        assert abs(lp.logprob - ref[i, t].item()) < 1e-5, i
        top = torch.topk(ref[i], 3)
        assert [tid for tid, _ in lp.top] == top.indices.tolist(), i
        assert max(abs(v - w) for (_, v), w in zip(lp.top, top.values.tolist())) < 1e-5


def test_penalized_greedy_is_the_same_under_every_method(server):
    with TandemClient(server.address) as c:
        ref = c.generate(target="small", prompt=PROMPT, max_new_tokens=32, ignore_eos=True, method="off", logprobs=1, **PENALTIES)
        plain = c.generate(target="small", prompt=PROMPT, max_new_tokens=32, ignore_eos=True, method="off")
        assert ref.token_ids != plain.token_ids  # the penalties change the output here
        assert ref.seed is None  # greedy: no seed to echo
        for method in ("sd", "sorted", "pearl", "spectr"):
            out = c.generate(target="small", prompt=PROMPT, max_new_tokens=32, ignore_eos=True, method=method, logprobs=1, **PENALTIES)
            assert out.token_ids == ref.token_ids, method
            assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(out.logprobs, ref.logprobs)), method


def test_token_ids_input_equals_the_raw_text_prompt(server, prompt_ids):
    with TandemClient(server.address) as c:
        text = c.generate(target="small", prompt=PROMPT, raw_prompt=True, max_new_tokens=16, ignore_eos=True, method="sd")
        ids = c.generate(target="small", prompt_token_ids=prompt_ids, max_new_tokens=16, ignore_eos=True, method="sd")
    assert ids.token_ids == text.token_ids and ids.usage["prompt_tokens"] == len(prompt_ids)


def test_the_server_draws_a_seed_and_resending_it_reproduces(server):
    args = {"target": "small", "prompt": PROMPT, "max_new_tokens": 24, "ignore_eos": True, "method": "sd", "temperature": 1.0}
    with TandemClient(server.address) as c:
        first = c.generate(**args)
        assert first.seed is not None
        again = c.generate(**args, seed=first.seed)
        other = c.generate(**args)
    assert again.seed == first.seed and again.token_ids == first.token_ids
    assert other.seed != first.seed and other.token_ids != first.token_ids  # a fresh draw, not a fixed default


@pytest.mark.parametrize(
    ("sampling", "prompt_token_ids", "field"),
    [
        ({"min_p": 1.5}, None, "sampling.min_p"),
        ({"min_p": math.nan}, None, "sampling.min_p"),
        ({"repetition_penalty": 0.0}, None, "sampling.repetition_penalty"),
        ({"repetition_penalty": math.inf}, None, "sampling.repetition_penalty"),
        ({"frequency_penalty": 2.5}, None, "sampling.frequency_penalty"),
        ({"presence_penalty": -3.0}, None, "sampling.presence_penalty"),
        ({"logprobs": 21}, None, "sampling.logprobs"),
        ({}, [], "prompt_token_ids"),
        ({}, [3, 4, 64], "prompt_token_ids[2]"),
        ({}, [3] * 8192, "prompt_token_ids"),
        ({"max_new_tokens": 200}, [3] * 8100, "sampling.max_new_tokens"),
    ],
)
def test_bad_new_fields_are_invalid_argument_naming_them(server, sampling, prompt_token_ids, field):
    """Through the raw stub: the server checks everything itself (the client would refuse
    most of these before sending)."""
    req = pb.GenerateRequest(target="small", sampling=pb.SamplingParams(**sampling))
    if prompt_token_ids is None:
        req.prompt = PROMPT
    else:
        req.prompt_token_ids.CopyFrom(pb.TokenIds(ids=prompt_token_ids))
    with grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.TandemStub(ch).Generate(req, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(field), info.value.details()


def test_logprobs_at_the_limit_are_accepted(server):
    with TandemClient(server.address) as c:
        out = c.generate(target="small", prompt=PROMPT, max_new_tokens=2, ignore_eos=True, logprobs=20)
    assert len(out.logprobs) == 2 and all(len(lp.top) == 20 for lp in out.logprobs)


# ----------------------------------------------------------------------------------------
# the client, without a server
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_p": 1.1}, "min_p"),
        ({"min_p": "0.1"}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"prompt": None, "prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt": None, "prompt_token_ids": [1, -2]}, r"prompt_token_ids\[1\]"),
        ({"prompt": None, "prompt_token_ids": "abc"}, "prompt_token_ids"),
        ({"prompt_token_ids": [1]}, "prompt, messages and prompt_token_ids"),
        ({"prompt": None, "prompt_token_ids": [1], "raw_prompt": True}, "raw_prompt"),
    ],
)
def test_client_refuses_bad_new_arguments_naming_them(kwargs, field):
    args = {"target": "small", "prompt": "hi", **kwargs}
    if args["prompt"] is None:
        del args["prompt"]
    with pytest.raises(ValueError, match=field):
        build_generate_request(**args)


def test_client_builds_the_new_fields_and_reads_them_back():
    req = build_generate_request(
        target="small", prompt_token_ids=[4, 5], min_p=0.1, repetition_penalty=1.2, frequency_penalty=-0.5, presence_penalty=0.5, logprobs=2
    )
    assert req.WhichOneof("input") == "prompt_token_ids" and list(req.prompt_token_ids.ids) == [4, 5]
    s = req.sampling
    assert s.HasField("min_p") and s.logprobs == 2 and s.frequency_penalty == -0.5
    assert not build_generate_request(target="small", prompt="hi").sampling.HasField("repetition_penalty")  # unset stays unset
    msgs = [
        pb.GenerateResponse(token_ids=[7, 8], logprobs=[pb.TokenLogprob(logprob=-0.5, top=[pb.TopLogprob(token_id=7, logprob=-0.5)]), pb.TokenLogprob(logprob=-1.0)]),
        pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH, seed=99),
    ]
    chunks = [chunk_from_proto(m) for m in msgs]
    assert chunks[0].logprobs[0].token_id == 7 and chunks[0].logprobs[0].top == [(7, -0.5)] and chunks[0].seed is None
    result = collect_chunks(chunks)
    assert [lp.token_id for lp in result.logprobs] == [7, 8] and result.seed == 99
