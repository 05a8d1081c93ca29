"""The runner's per-layer ops as single C++ calls (actors/layer_ops.py, actors/csrc/
layer_ops.cpp) against torch's: the rotary embedding and the residual add round exactly as
torch's ops do and must be equal; RMSNorm (its mean summed in another order) and SiLU (its exp
within an ulp of torch's) may differ only where a value sits within float rounding of a bf16
rounding boundary: by one bf16 step, in at most 1e-3 of the elements (such values are a
~1e-5 fraction: float's relative error ~1e-7 over bf16's step 2^-8). A negative control shows
the comparison fires on a wrong op. ggml's bf16-in, bf16-out matmul equals its float32 one
rounded. Runs where `make kernels` built the extension."""

from __future__ import annotations

import pytest
import torch

from tandem.actors import ggml_kernel, layer_ops

ext = ggml_kernel.load()
needs_ext = pytest.mark.skipif(ext is None or not hasattr(ext, "rms_norm"), reason=f"ggml kernels: {ggml_kernel.build_status()[1]}")
EPS = 1e-6
H, KVH, HD = 12, 2, 128  # Qwen2.5-1.5B's attention


def bf16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of bf16's step at each element's magnitude."""
    a, b = a.float(), b.float()
    scale = torch.maximum(a.abs(), b.abs()).clamp(min=1e-30)
    step = torch.exp2(torch.floor(torch.log2(scale)) - 7)  # bf16: 8 significant bits
    return (a - b).abs() / step


def alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal but for at most one bf16 step in at most 1e-3 of the elements."""
    steps = bf16_steps(a, b)
    return bool(steps.max() <= 1.0) and float((steps > 0).float().mean()) <= 1e-3


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 5, 1536, generator=g) * 3).bfloat16()
    delta = torch.randn(3, 5, 1536, generator=g).bfloat16()
    w = torch.randn(1536, generator=g).bfloat16()
    qkv = torch.randn(3, 5, (H + 2 * KVH) * HD, generator=g).bfloat16()
    cos = torch.randn(64, HD, generator=g).bfloat16()
    sin = torch.randn(64, HD, generator=g).bfloat16()
    pos = torch.arange(15).view(3, 5) + 7
    gate_up = (torch.randn(3, 5, 2 * 8960, generator=g) * 4).bfloat16()
    return x, delta, w, qkv, cos, sin, pos, gate_up


@needs_ext
def test_fused_ops_equal_torchs():
    ref, fused = layer_ops.TorchLayerOps(EPS), layer_ops.FusedLayerOps(EPS, ext)
    x, delta, w, qkv, cos, sin, pos, gate_up = inputs()
    assert alike(fused.rms(x, w), ref.rms(x, w))
    s_ref, y_ref = ref.add_rms(x, delta, w)
    s, y = fused.add_rms(x, delta, w)
    assert torch.equal(s, s_ref) and alike(y, y_ref)
    q_ref, k_ref = ref.rope_qk(qkv.clone(), ref.rope_tables(cos, sin, pos), H, KVH, HD)
    q, k = fused.rope_qk(qkv.clone(), fused.rope_tables(cos, sin, pos), H, KVH, HD)
    assert q.shape == q_ref.shape == (3, 5, H, HD) and k.shape == k_ref.shape == (3, 5, KVH, HD)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert alike(fused.silu_mul(gate_up), ref.silu_mul(gate_up))
    # packed rows ([T, width], as _run_layers_packed passes them) and one row
    flat = qkv.view(15, -1)
    q_ref, _ = ref.rope_qk(flat.clone(), ref.rope_tables(cos, sin, pos.view(-1)), H, KVH, HD)
    q, _ = fused.rope_qk(flat.clone(), fused.rope_tables(cos, sin, pos.view(-1)), H, KVH, HD)
    assert torch.equal(q, q_ref)
    assert alike(fused.rms(x[:1, :1], w), ref.rms(x[:1, :1], w))
    # a non-contiguous input is taken as well (the fused ops copy it first)
    xt = x.transpose(0, 1)
    assert alike(fused.rms(xt, w), ref.rms(xt, w))


@needs_ext
def test_the_comparison_fires_on_a_wrong_op():
    """Negative controls: the rotary with sin and cos swapped, a norm with another epsilon
    scale, SiLU replaced by GELU."""
    ref, fused = layer_ops.TorchLayerOps(EPS), layer_ops.FusedLayerOps(EPS, ext)
    x, _, w, qkv, cos, sin, pos, gate_up = inputs(1)
    q, _ = fused.rope_qk(qkv.clone(), fused.rope_tables(sin, cos, pos), H, KVH, HD)
    q_ref, _ = ref.rope_qk(qkv.clone(), ref.rope_tables(cos, sin, pos), H, KVH, HD)
    assert not torch.equal(q, q_ref)
    assert not alike(layer_ops.FusedLayerOps(1.0, ext).rms(x * 0.1, w), ref.rms(x * 0.1, w))
    inter = gate_up.shape[-1] // 2
    gelu = torch.nn.functional.gelu(gate_up[..., :inter]) * gate_up[..., inter:]
    assert not alike(fused.silu_mul(gate_up), gelu)


@needs_ext
def test_bf16_matmul_equals_the_float32_one_rounded():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 512, generator=g)
    lin = ggml_kernel.GgmlLinear(ggml_kernel.quantize_rows(w, "Q8_0"), "Q8_0", 512)
    x = torch.randn(3, 512, generator=g).bfloat16()
    y = lin(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, lin(x.float()).bfloat16())


def test_the_runner_takes_the_fused_ops_only_on_ggml_in_bf16_on_the_cpu():
    cpu = torch.device("cpu")
    fused_here = ext is not None and hasattr(ext, "rms_norm")
    assert layer_ops.for_runner("pack-ggml", torch.bfloat16, cpu, EPS).name == ("fused" if fused_here else "torch")
    assert layer_ops.for_runner("int4-ggml", torch.bfloat16, cpu, EPS).name == ("fused" if fused_here else "torch")
    assert layer_ops.for_runner("pack-ggml", torch.float32, cpu, EPS).name == "torch"
    assert layer_ops.for_runner("pack", torch.bfloat16, cpu, EPS).name == "torch"
    assert layer_ops.for_runner("dense", torch.bfloat16, torch.device("meta"), EPS).name == "torch"


def attention_case(seed: int, starts=(0, 37, 200), counts=(1, 5, 9), capacity=256):
    """Caches holding `starts[i]` earlier positions of random keys and values, and the qkv
    rows (packed, [T, width]) of each sequence's next `counts[i]` tokens."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(KVH, capacity, HD, generator=g).bfloat16() for _ in starts]
    values = [torch.randn(KVH, capacity, HD, generator=g).bfloat16() for _ in starts]
    qkv = (torch.randn(sum(counts), (H + 2 * KVH) * HD, generator=g) * 2).bfloat16()
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    return qkv, keys, values, offsets, list(starts), list(counts)


def attention_reference(qkv, keys, values, offsets, starts, counts, *, causal=True):
    """Float32 scaled_dot_product_attention per sequence: its rows' k and v written into a
    copy of its cache, query j seeing keys 0 .. start + j (every key written when not causal)."""
    out = torch.empty(qkv.shape[0], H * HD)
    for kc, vc, o, s, n in zip(keys, values, offsets, starts, counts):
        kc, vc = kc.clone(), vc.clone()
        rows = qkv[o : o + n]
        kc[:, s : s + n] = rows[:, H * HD : (H + KVH) * HD].view(n, KVH, HD).transpose(0, 1)
        vc[:, s : s + n] = rows[:, (H + KVH) * HD :].view(n, KVH, HD).transpose(0, 1)
        q = rows[:, : H * HD].view(n, H, HD).transpose(0, 1).float()  # [H, n, HD]
        k = kc[:, : s + n].float().repeat_interleave(H // KVH, dim=0)  # [H, L, HD]
        v = vc[:, : s + n].float().repeat_interleave(H // KVH, dim=0)
        mask = torch.arange(s + n)[None, :] <= torch.arange(s, s + n)[:, None] if causal else None
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out[o : o + n] = a.transpose(0, 1).reshape(n, H * HD)
    return out


def rounded_from(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """out (bf16) is float32 `ref` rounded, but for float error: within half a bf16 step of
    each value, plus 1e-4 for the sums of O(1) terms that cancel to nearly nothing (float32's
    error on such a sum is ~1e-6, far below one bf16 step of the terms)."""
    ref = ref.float()
    step = torch.exp2(torch.floor(torch.log2(ref.abs().clamp(min=1e-30))) - 7)
    return bool(((out.float() - ref).abs() <= 0.5 * step + 1e-4).all())


def fused_attend(fused, qkv, keys, values, offsets, starts, counts):
    out = torch.zeros(qkv.shape[0], H * HD, dtype=torch.bfloat16)
    fused.attend(qkv, H, KVH, HD, keys, values, offsets, starts, counts, out)
    return out


@needs_ext
def test_attend_writes_the_cache_and_equals_torchs_attention_to_rounding():
    """Decode rows and verification blocks against caches of 0, 37 and 200 positions, GQA as
    the 1.5B pack's (12 query heads on 2 kv heads): the new k and v land in each cache as
    they are, and the output is float32 attention rounded to bf16 but for float error
    (rounded_from). Negative control: attention
    that lets a block's rows see the keys after them is told apart."""
    fused = layer_ops.FusedLayerOps(EPS, ext)
    qkv, keys, values, offsets, starts, counts = attention_case(3)
    ref = attention_reference(qkv, keys, values, offsets, starts, counts)
    before = [k.clone() for k in keys]
    out = fused_attend(fused, qkv, keys, values, offsets, starts, counts)
    for kc, vc, old, o, s, n in zip(keys, values, before, offsets, starts, counts):
        rows = qkv[o : o + n]
        assert torch.equal(kc[:, s : s + n], rows[:, H * HD : (H + KVH) * HD].view(n, KVH, HD).transpose(0, 1))
        assert torch.equal(vc[:, s : s + n], rows[:, (H + KVH) * HD :].view(n, KVH, HD).transpose(0, 1))
        assert torch.equal(kc[:, :s], old[:, :s]) and torch.equal(kc[:, s + n :], old[:, s + n :])
    assert rounded_from(out, ref)
    peeking = attention_reference(qkv, [k.clone() for k in before], values, offsets, starts, counts, causal=False)
    assert not rounded_from(out, peeking)


@needs_ext
def test_attend_gives_each_row_bit_for_bit_as_alone():
    """A block's row j equals the same token's row computed alone, after rows 0 .. j - 1 went
    into the cache one call each, and whatever other sequences share the call: verification
    of a draft block and one-token decode give the same values (the runner's greedy output
    equals its own `ar`). Control: the row alone one position earlier differs."""
    fused = layer_ops.FusedLayerOps(EPS, ext)
    qkv, keys, values, offsets, starts, counts = attention_case(4, starts=(0, 19, 120), counts=(3, 9, 16))
    block = fused_attend(fused, qkv, [k.clone() for k in keys], [v.clone() for v in values], offsets, starts, counts)
    for i, (o, s, n) in enumerate(zip(offsets, starts, counts)):
        kc, vc = keys[i].clone(), values[i].clone()
        for j in range(n):
            row = qkv[o + j : o + j + 1]
            alone = fused_attend(fused, row, [kc], [vc], [0], [s + j], [1])
            assert torch.equal(alone, block[o + j : o + j + 1]), (i, j)
        if s > 0:
            kc2, vc2 = keys[i].clone(), values[i].clone()
            shifted = fused_attend(fused, qkv[o + n - 1 : o + n], [kc2], [vc2], [0], [s - 1], [1])
            assert not torch.equal(shifted, block[o + n - 1 : o + n])


@needs_ext
def test_attend_refuses_blocks_past_its_rows_and_caches_it_cannot_fit():
    fused = layer_ops.FusedLayerOps(EPS, ext)
    n = fused.attend_max_rows + 1
    qkv, keys, values, offsets, starts, counts = attention_case(5, starts=(3,), counts=(n,))
    with pytest.raises(ValueError, match="attend takes 1 to"):
        fused_attend(fused, qkv, keys, values, offsets, starts, counts)
    qkv, keys, values, offsets, starts, counts = attention_case(5, starts=(250,), counts=(9,))
    with pytest.raises(RuntimeError, match="do not fit"):
        fused_attend(fused, qkv, keys, values, offsets, starts, counts)
    assert not layer_ops.TorchLayerOps(EPS).attends(1, HD)  # torch's ops leave attention to the runner
    assert fused.attends(1, HD) and fused.attends(fused.attend_max_rows, 64) and not fused.attends(1, 8)
    assert not fused.attends(0, HD)
