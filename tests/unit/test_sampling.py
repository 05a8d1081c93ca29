"""speculation.sampling: params validation, logits -> probs, generators, sparse q."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.speculation.sampling import (
    SamplingParams,
    SparseDist,
    logits_to_probs,
    make_generator,
    sample,
    truncate_to_sparse,
)


def logits_of(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (log; -inf for zeros)."""
    return torch.log(torch.tensor(probs, dtype=torch.float64)).to(torch.float32)


# --- SamplingParams ---------------------------------------------------------------------


def test_defaults_are_greedy() -> None:
    params = SamplingParams()
    assert params.greedy
    assert not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, r"^temperature must be >= 0, got -1.0$"),
        ({"temperature": math.nan}, r"^temperature must be finite"),
        ({"temperature": math.inf}, r"^temperature must be finite"),
        ({"temperature": True}, r"^temperature must be a real number"),
        ({"temperature": "1.0"}, r"^temperature must be a real number"),
        ({"top_k": -3}, r"^top_k must be >= 0, got -3$"),
        ({"top_k": 2.5}, r"^top_k must be an integer"),
        ({"top_k": False}, r"^top_k must be an integer"),
        ({"top_p": 0.0}, r"^top_p must be in \(0, 1\], got 0.0$"),
        ({"top_p": 1.5}, r"^top_p must be in \(0, 1\], got 1.5$"),
        ({"top_p": -math.inf}, r"^top_p must be finite"),
        ({"top_p": math.nan}, r"^top_p must be finite"),
        ({"top_p": None}, r"^top_p must be a real number"),
        ({"seed": -1}, r"^seed must be in \[0, 2\*\*64\)"),
        ({"seed": 2**64}, r"^seed must be in \[0, 2\*\*64\)"),
        ({"seed": 1.0}, r"^seed must be an integer"),
        ({"seed": True}, r"^seed must be an integer"),
    ],
)
def test_sampling_params_rejects_bad_values_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_normalises_numeric_types() -> None:
    params = SamplingParams(temperature=1, top_k=np.int64(5), top_p=np.float32(0.5), seed=np.uint64(7))
    assert params == SamplingParams(temperature=1.0, top_k=5, top_p=0.5, seed=7)
    assert isinstance(params.temperature, float) and isinstance(params.top_k, int)
    assert hash(params) == hash(SamplingParams(temperature=1.0, top_k=5, top_p=0.5, seed=7))


def test_sampling_params_is_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


# --- logits_to_probs --------------------------------------------------------------------


def test_temperature_one_is_softmax() -> None:
    probs = logits_to_probs(logits_of([1 / 7, 2 / 7, 4 / 7]), SamplingParams(temperature=1.0))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([1 / 7, 2 / 7, 4 / 7]))


def test_temperature_two_flattens() -> None:
    # logits [0, ln 2, ln 4] / 2 = [0, ln sqrt2, ln 2] -> [1, sqrt2, 2] / (3 + sqrt2)
    logits = torch.tensor([0.0, math.log(2.0), math.log(4.0)])
    expected = torch.tensor([1.0, math.sqrt(2.0), 2.0]) / (3.0 + math.sqrt(2.0))
    torch.testing.assert_close(logits_to_probs(logits, SamplingParams(temperature=2.0)), expected)


def test_top_k_keeps_k_largest() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    e3, e2 = math.exp(3.0), math.exp(2.0)
    expected = torch.tensor([0.0, e3 / (e3 + e2), e2 / (e3 + e2), 0.0])
    torch.testing.assert_close(logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2)), expected)


def test_top_k_keeps_ties_at_the_boundary_like_transformers() -> None:
    logits = torch.tensor([2.0, 1.0, 2.0, 2.0])
    expected = torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3])
    torch.testing.assert_close(logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2)), expected)


def test_top_k_at_least_vocab_is_off() -> None:
    logits = logits_of([0.1, 0.2, 0.7])
    params = SamplingParams(temperature=1.0, top_k=3)
    torch.testing.assert_close(logits_to_probs(logits, params), torch.tensor([0.1, 0.2, 0.7]))


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.7, [5 / 8, 3 / 8, 0.0, 0.0]),  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: two tokens
        (0.85, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # 0.8 < 0.85: three tokens
        (0.01, [1.0, 0.0, 0.0, 0.0]),  # the top token alone already covers it
        (1.0, [0.5, 0.3, 0.15, 0.05]),  # off
    ],
)
def test_top_p_keeps_smallest_set_reaching_the_mass(top_p: float, expected: list[float]) -> None:
    # Token order shuffled so the nucleus is not just a prefix of the vocabulary.
    order = [2, 0, 3, 1]
    base = [0.5, 0.3, 0.15, 0.05]
    logits = logits_of([base[i] for i in order])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    torch.testing.assert_close(probs, torch.tensor([expected[i] for i in order]))


def test_top_k_is_applied_before_top_p() -> None:
    # top-k=2 first: [0.4, 0.3] renormalise to [4/7, 3/7]; 4/7 >= 0.5 so top-p keeps one
    # token. The reverse order (top-p on [0.4, 0.3, 0.2, 0.1] keeps two) would give [4/7, 3/7].
    logits = logits_of([0.4, 0.3, 0.2, 0.1])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_greedy_is_one_hot_and_ties_go_to_lowest_index() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.bfloat16)
    probs = logits_to_probs(logits, SamplingParams(temperature=0.0, top_k=1, top_p=0.5))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(probs.argmax(-1), logits.float().argmax(-1))


def test_batched_shapes_and_no_mutation() -> None:
    logits = torch.randn(2, 3, 11, generator=make_generator(0))
    before = logits.clone()
    probs = logits_to_probs(logits, SamplingParams(temperature=0.8, top_k=5, top_p=0.9))
    assert probs.shape == (2, 3, 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    assert torch.equal(logits, before)
    assert ((probs > 0).sum(-1) <= 5).all()


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=12),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 12),
    top_p=st.floats(0.01, 1.0),
)
def test_processed_probs_are_a_distribution_containing_the_argmax(
    logits: list[float], temperature: float, top_k: int, top_p: float
) -> None:
    scores = torch.tensor(logits)
    probs = logits_to_probs(scores, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    assert (probs >= 0).all()
    assert abs(float(probs.sum()) - 1.0) < 1e-5
    assert probs[scores.argmax()] > 0  # the top token always survives
    if top_k:
        scaled = scores / temperature  # top-k compares tempered logits, ties included
        kth_largest = scaled.topk(min(top_k, len(logits))).values[-1]
        assert not ((probs > 0) & (scaled < kth_largest)).any()


# --- generators and sampling ------------------------------------------------------------


def test_make_generator_is_seeded() -> None:
    a = torch.rand(5, generator=make_generator(123))
    b = torch.rand(5, generator=make_generator(123))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(5, generator=make_generator(124)))
    assert make_generator(None).device.type == "cpu"


def test_sample_shapes_and_one_hot_rows() -> None:
    generator = make_generator(0)
    probs = torch.nn.functional.one_hot(torch.tensor([[3, 1], [0, 2]]), 5).float()  # [2, 2, 5]
    tokens = sample(probs, generator)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 2)
    assert tokens.tolist() == [[3, 1], [0, 2]]
    assert sample(probs[0, 0], generator).shape == ()


def test_sample_follows_probs(stat_tools) -> None:
    probs = torch.tensor([0.05, 0.0, 0.4, 0.25, 0.0, 0.2, 0.1, 0.0])
    n = 20_000
    tokens = sample(probs.expand(n, -1), make_generator(7))  # [n]
    counts = np.bincount(tokens.numpy(), minlength=8)
    fit = stat_tools.chi_square_test(counts, probs.double().numpy())
    assert fit.passes, str(fit)


# --- sparse q ---------------------------------------------------------------------------


def test_sparse_dist_dense_round_trip() -> None:
    dist = SparseDist(ids=np.array([4, 1]), probs=np.array([0.75, 0.25]))
    assert dist.ids.dtype == np.int64 and dist.probs.dtype == np.float32
    torch.testing.assert_close(dist.dense(6), torch.tensor([0.0, 0.25, 0.0, 0.0, 0.75, 0.0]))


@pytest.mark.parametrize(
    ("ids", "probs", "message"),
    [
        ([1, 1], [0.5, 0.5], "^ids must be distinct"),
        ([1, 2], [0.5, 0.6], "^probs must sum to 1"),
        ([1, 2], [1.5, -0.5], "^probs must be finite and >= 0"),
        ([-1], [1.0], "^ids must be >= 0"),
        ([1, 2], [1.0], "^ids and probs must be 1-D of equal length"),
        ([], [], "^ids must be non-empty"),
    ],
)
def test_sparse_dist_validates(ids: list[int], probs: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparseDist(ids=np.array(ids, dtype=np.int64), probs=np.array(probs, dtype=np.float32))


def test_sparse_dist_dense_rejects_small_vocab() -> None:
    with pytest.raises(ValueError, match="^vocab_size"):
        SparseDist(ids=np.array([7]), probs=np.array([1.0])).dense(5)


def test_truncate_to_sparse_keeps_top_k_renormalised() -> None:
    probs = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    dist = truncate_to_sparse(probs, 3)
    assert sorted(dist.ids.tolist()) == [1, 3, 4]
    torch.testing.assert_close(dist.dense(5), torch.tensor([0.0, 4 / 9, 0.0, 3 / 9, 2 / 9]))
    assert torch.equal(probs, torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2]))  # input untouched


def test_truncate_to_sparse_drops_zero_mass_and_clamps_k() -> None:
    dist = truncate_to_sparse(torch.tensor([0.0, 0.6, 0.0, 0.4]), 10)
    assert sorted(dist.ids.tolist()) == [1, 3]
    with pytest.raises(ValueError, match="^k must be >= 1"):
        truncate_to_sparse(torch.tensor([1.0]), 0)
