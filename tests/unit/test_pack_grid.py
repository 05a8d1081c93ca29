"""The packs' 4-bit grid (deploy/pack_grid.py): Q4_K blocks split into codes, group scales
and minimums that reproduce gguf-py's own dequantization exactly; nibble packing; names;
the target quantize setting."""

from __future__ import annotations

import numpy as np
import pytest

from tandem.deploy.pack_grid import draft_quantize, hf_linear_name, pack_nibbles, q4k_grid, target_quantize, unpack_nibbles


def random_q4k_rows(rng, out_f: int, in_f: int) -> np.ndarray:
    """Valid Q4_K rows: random codes and 6-bit sub-scales, finite positive f16 d and dmin."""
    n = out_f * in_f // 256
    blocks = rng.integers(0, 256, size=(n, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(rng.uniform(1e-4, 1e-2, n).astype(np.float16).tobytes(), np.uint8).reshape(n, 2)
    blocks[:, 2:4] = np.frombuffer(rng.uniform(1e-4, 1e-2, n).astype(np.float16).tobytes(), np.uint8).reshape(n, 2)
    return blocks.reshape(out_f, -1)


def test_grid_reproduces_ggufs_dequantization_exactly():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rng = np.random.default_rng(0)
    out_f, in_f = 6, 512
    rows = random_q4k_rows(rng, out_f, in_f)
    want = dequantize(rows, GGMLQuantizationType.Q4_K).reshape(out_f, in_f)
    codes, scale, minimum = q4k_grid(rows, out_f, in_f)
    assert codes.shape == (out_f, in_f) and codes.max() <= 15
    assert scale.shape == minimum.shape == (out_f, in_f // 32)
    got = (codes.reshape(out_f, -1, 32) * scale[..., None] - minimum[..., None]).reshape(out_f, in_f)
    assert np.array_equal(got, want)
    # control: a wrong sub-block order (high nibbles first) does not reproduce it
    swapped = codes.reshape(out_f, -1, 2, 32)[:, :, ::-1].reshape(out_f, in_f)
    bad = (swapped.reshape(out_f, -1, 32) * scale[..., None] - minimum[..., None]).reshape(out_f, in_f)
    assert not np.array_equal(bad, want)


def test_nibbles_round_trip():
    codes = np.random.default_rng(1).integers(0, 16, size=(5, 64), dtype=np.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 32) and np.array_equal(unpack_nibbles(packed), codes)


def test_names_and_quantize_setting():
    assert hf_linear_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_linear_name("blk.10.ffn_down.weight") == "model.layers.10.mlp.down_proj.weight"
    assert hf_linear_name("output.weight") == "lm_head.weight"
    assert hf_linear_name("blk.0.attn_norm.weight") is None and hf_linear_name("token_embd.weight") is None
    assert target_quantize("qwen2.5-coder-1.5b-instruct", "auto") == "pack"
    assert target_quantize("/models/my-model", "auto") is None
    assert target_quantize("qwen2.5-coder-1.5b-instruct", "none") is None
    assert target_quantize("x", "int8") == "int8"
    # a draft: its own grid for a pack, int4 re-quantized for anything else
    assert draft_quantize("qwen2.5-coder-0.5b-instruct", "auto") == "pack"
    assert draft_quantize("/models/my-draft", "auto") == "int4"
    assert draft_quantize("qwen2.5-coder-0.5b-instruct", "none") is None
    assert draft_quantize("qwen2.5-coder-0.5b-instruct", "int4") == "int4"


def test_config_refuses_quantized_sharded_targets():
    from tandem.deploy.config import parse_config

    assert parse_config({"targets": [{"name": "t"}]}).targets[0].quantize == "auto"
    with pytest.raises(ValueError, match="unsharded"):
        parse_config({"targets": [{"name": "t", "shards": 2, "quantize": "pack"}]})
