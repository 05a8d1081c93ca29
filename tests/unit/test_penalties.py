"""speculation.sampling: min_p, the penalties (against a per-token reference written out
here), token counts over a restricted head's columns, and token_logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tandem.speculation.sampling import (
    SamplingParams,
    logits_to_probs,
    penalize,
    token_counts,
    token_logprobs,
)

PEN = SamplingParams(repetition_penalty=1.7, frequency_penalty=0.6, presence_penalty=-0.4)


def reference(row: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """vLLM's penalties, one token at a time: repetition over prompt + output (divide a
    positive logit, multiply a negative one), then frequency and presence over output."""
    out = row.clone()
    for t in set(prompt) | set(output):
        out[t] = out[t] / params.repetition_penalty if out[t] > 0 else out[t] * params.repetition_penalty
    for t in set(output):
        out[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    return out


def test_each_row_counts_the_block_tokens_before_it():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=gen) * 3  # [draft_len + 1, vocab], both signs
    prompt, output, block = [0, 1, 1, 5], [2, 5, 2], [3, 2, 8]
    got = penalize(logits, PEN, prompt=prompt, output=output, block=block)
    for i in range(4):
        want = reference(logits[i], PEN, prompt, output + block[:i])
        assert torch.allclose(got[i], want, atol=1e-6), i
    # the precomputed prompt counts give the same, and one row [vocab] works alone
    assert torch.equal(penalize(logits, PEN, prompt=token_counts(prompt, 9), output=output, block=block), got)
    assert torch.allclose(penalize(logits[2], PEN, prompt=prompt, output=output + block[:2]), got[2])


def test_unpenalized_params_return_the_logits_themselves():
    logits = torch.randn(2, 5)
    assert penalize(logits, SamplingParams(temperature=1.0, min_p=0.2), prompt=[1], output=[2], block=[3]) is logits
    assert not SamplingParams().penalized and SamplingParams(presence_penalty=0.1).penalized


def test_too_short_block_is_refused():
    with pytest.raises(ValueError, match="block"):
        penalize(torch.zeros(3, 4), PEN, prompt=[], output=[], block=[1])


def test_restricted_head_columns():
    """A draft head over token ids [7, 2, 9]: counts land on the columns of those ids, ids
    outside the head (and outside the vocabulary) count nowhere."""
    columns = torch.tensor([7, 2, 9])
    assert token_counts([2, 2, 9, 4, 100], 3, columns).tolist() == [0.0, 2.0, 1.0]
    logits = torch.tensor([[1.0, -1.0, 2.0]])
    got = penalize(logits, SamplingParams(frequency_penalty=1.0), prompt=[], output=[2, 2, 4], columns=columns)
    assert got.tolist() == [[1.0, -3.0, 2.0]]


def test_greedy_follows_the_penalized_argmax():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = SamplingParams(presence_penalty=0.5)
    scores = penalize(logits, params, prompt=[], output=[0])
    assert int(logits_to_probs(scores, params).argmax()) == 1


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    out = logits_to_probs(probs.log(), SamplingParams(temperature=1.0, min_p=0.2))  # keep p >= 0.1
    assert out[3] == 0 and torch.allclose(out[:3], probs[:3] / probs[:3].sum())
    hot = logits_to_probs(probs.log(), SamplingParams(temperature=2.0, min_p=0.5))  # after temperature
    tempered = torch.softmax(probs.log() / 2.0, dim=-1)
    assert torch.equal(hot > 0, tempered >= 0.5 * tempered.max())
    assert int((logits_to_probs(probs.log(), SamplingParams(temperature=1.0, min_p=1.0)) > 0).sum()) == 1


def test_min_p_then_top_p_renormalises_once():
    """vLLM's order: min_p first, then top-p over what is left (top-p first would keep 0.2:
    0.4 + 0.3 < 0.75 of the untruncated mass)."""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = logits_to_probs(probs.log(), SamplingParams(temperature=1.0, min_p=0.3, top_p=0.75))
    # min_p keeps p >= 0.12: {0.4, 0.3, 0.2} -> {4/9, 3/9, 2/9}; 4/9 + 3/9 >= 0.75 ends the nucleus
    assert out.tolist() == pytest.approx([4 / 7, 3 / 7, 0.0, 0.0], abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_p": -0.1}, r"^min_p must be in \[0, 1\]"),
        ({"min_p": 1.5}, r"^min_p must be in \[0, 1\]"),
        ({"min_p": math.nan}, r"^min_p must be finite"),
        ({"repetition_penalty": 0.0}, r"^repetition_penalty must be > 0"),
        ({"repetition_penalty": -1.0}, r"^repetition_penalty must be > 0"),
        ({"frequency_penalty": 2.5}, r"^frequency_penalty must be in \[-2, 2\]"),
        ({"presence_penalty": -3}, r"^presence_penalty must be in \[-2, 2\]"),
        ({"presence_penalty": "1"}, r"^presence_penalty must be a real number"),
        ({"logprobs": -1}, r"^logprobs must be >= 0"),
        ({"logprobs": 1.5}, r"^logprobs must be an integer"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_token_logprobs_are_the_raw_log_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    out = token_logprobs(logits, [1, 2], 2)
    ref = torch.log_softmax(logits, dim=-1)
    assert out[0].logprob == pytest.approx(ref[0, 1].item()) and out[1].logprob == pytest.approx(ref[1, 2].item())
    assert [t for t, _ in out[0].top] == [0, 1] and [t for t, _ in out[1].top] == [2, 3]
    assert out[1].top[0][1] == pytest.approx(ref[1, 2].item())
    assert token_logprobs(logits, [0, 0], 0)[0].top == ()
    assert len(token_logprobs(logits, [0, 0], 50)[0].top) == 4  # at most the vocabulary
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(logits, [0], 1)
