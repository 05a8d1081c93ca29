"""tandem batch records: the sampling object takes the same fields as the gRPC request's
SamplingParams (penalties and min_p included), and a bad value is an error record naming the
field, not a failed job."""

from __future__ import annotations

import json

from tandem.deploy.batch import scan_input, sampling_params


def scan(tmp_path, *records):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return scan_input(path, targets=["small"], done=set())


def test_penalties_and_min_p_reach_the_sampling_params(tmp_path):
    s = {"temperature": 0.7, "seed": 3, "min_p": 0.1, "repetition_penalty": 1.2, "frequency_penalty": 0.5,
         "presence_penalty": -0.25, "max_new_tokens": 8, "logprobs": 3}
    pending, errors, _ = scan(tmp_path, {"prompt": "x", "sampling": s})
    assert not errors and len(pending) == 1
    params = sampling_params(json.loads(pending[0].payload)["sampling"])
    assert (params.min_p, params.repetition_penalty, params.frequency_penalty, params.presence_penalty) == (0.1, 1.2, 0.5, -0.25)
    assert params.temperature == 0.7 and params.seed == 3 and params.penalized and params.logprobs == 3
    # control: a record without them gets the defaults (no penalty, no logprobs)
    assert not sampling_params({}).penalized and sampling_params({}).min_p == 0.0 and sampling_params({}).logprobs is None


def test_a_bad_penalty_is_an_error_record_naming_the_field(tmp_path):
    pending, errors, _ = scan(
        tmp_path,
        {"prompt": "x", "sampling": {"repetition_penalty": 0}},
        {"prompt": "x", "sampling": {"presence_penalty": 3}},
        {"prompt": "x", "sampling": {"min_p": 1.5}},
        {"prompt": "x", "sampling": {"logprobs": 21}},  # above the server's MAX_TOP_LOGPROBS
        {"prompt": "x", "sampling": {"min_p": 0.5}},  # control: good
    )
    assert len(pending) == 1
    messages = [e["error"] for e in errors]
    for field, message in zip(["repetition_penalty", "presence_penalty", "min_p", "logprobs"], messages):
        assert field in message and "sampling" in message, message
