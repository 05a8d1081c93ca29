"""The small per-layer ops of the runner's forward (RMSNorm, residual add + RMSNorm, rotary
embedding of q and k, SiLU gate): torch's, or one C++ call each (actors/csrc/layer_ops.cpp,
built with ggml's extension by `make kernels`).

The C++ ops serve runners on ggml's kernels in bf16 on the CPU (`for_runner`): there the
forward is ggml's matmuls plus these, each a dozen torch ops dispatched from Python at
2-5 us apiece, about 10.5 of a 67 ms one-token step of the 1.5B pack (2 threads, Xeon with
AMX). They round to bf16 where torch's ops do, so both give the same values except where a
float sum runs in another order (the RMS mean) or exp differs by an ulp (SiLU); every method
of a runner uses the same ops, so its greedy output still equals its own `ar`. Other runners
(bf16 or float32 torch kernels, CUDA) keep torch's ops unchanged.

The fused ops also attend: decode steps, verification blocks and prefill chunks (`attends`:
up to ATTEND_MAX_ROWS rows a sequence) go through one C++ call a layer for every sequence of
the forward, which writes their keys and values into each cache and attends against it in
float, each row bit for bit as it computes alone; the runner runs torch's
scaled_dot_product_attention for longer blocks (a prompt fed to the runner whole) and on
torch's ops."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from tandem.actors.batching import PREFILL_CHUNK
from tandem.speculation.plan import MAX_DRAFT_LEN

# FusedLayerOps.attend: query rows a sequence, up to the longest verification block (a draft
# and its bonus row) and a prefill chunk, so that every block attends as the target's
# one-token steps do, and a row's bits never depend on its block's size (a reused prompt
# prefix relies on it, actors/prefix_cache.py). Measured (1.5B pack's heads, 2-core AVX-512
# EPYC, torch at one thread as on ggml's kernels): one row against 150 keys 17 us against
# scaled_dot_product_attention's 34 (with the copies around it, 2.6-3.1 ms a step of the 1.5B
# pack -> 1.0); 9 rows 161 against 198 us; 65 rows against 300 keys 2.2 ms against 2.1. A
# whole forward of the pack, interleaved, best of 4: 128-row prefill chunks at positions 0,
# 128 and 256 took 0.98, 1.02 and 1.05 s in C++ (one thread) against 1.00, 1.03 and 1.05 s
# on torch's flash attention at every thread; 100 rows 0.82 against 0.82.
ATTEND_MAX_ROWS = max(MAX_DRAFT_LEN + 1, PREFILL_CHUNK)


class TorchLayerOps:
    """The ops in torch (any device and dtype). RMSNorm takes float32 statistics and scales
    in the compute dtype, as the reference model does."""

    name = "torch"
    # query rows a sequence may bring to attend(); 0: no attend here, the runner runs torch's
    # scaled_dot_product_attention itself
    attend_max_rows = 0

    def __init__(self, eps: float):
        self.eps = eps

    def attends(self, rows: int, head_dim: int) -> bool:
        """Whether attend() takes a sequence's block of `rows` query rows of heads of
        `head_dim` (the C++ call works 16 floats at a time: a multiple of 16)."""
        return 0 < rows <= self.attend_max_rows and head_dim % 16 == 0

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(x.dtype)

    def add_rms(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, rms(x + delta) * weight): a residual add and the next norm."""
        s = x + delta
        return s, self.rms(s, weight)

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> tuple:
        """The rotary rows for positions `pos` (any shape), as rope_qk takes them."""
        return cos[pos].unsqueeze(-2), sin[pos].unsqueeze(-2)

    def rope_qk(self, qkv: torch.Tensor, tables: tuple, heads: int, kv_heads: int, head_dim: int):
        """q [..., heads, head_dim] and k [..., kv_heads, head_dim], rotated, from a fused
        projection qkv [..., (heads + 2 kv_heads) * head_dim] (q, k, v side by side)."""
        cos, sin = tables
        lead = qkv.shape[:-1]
        q = qkv[..., : heads * head_dim].view(*lead, heads, head_dim)
        k = qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].view(*lead, kv_heads, head_dim)
        return self._rope(q, cos, sin), self._rope(k, cos, sin)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up from a fused projection [..., 2 * inter] (gate, then up)."""
        inter = gate_up.shape[-1] // 2
        return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


class FusedLayerOps(TorchLayerOps):
    """The same ops as single C++ calls (bf16, CPU); see the module docstring."""

    name = "fused"

    def __init__(self, eps: float, ext):
        super().__init__(eps)
        self.ext = ext
        self.attend_max_rows = ATTEND_MAX_ROWS if hasattr(ext, "attend") else 0

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.ext.rms_norm(x.contiguous(), weight, self.eps)

    def add_rms(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, y = self.ext.add_rms_norm(x.contiguous(), delta.contiguous(), weight, self.eps)
        return s, y

    def rope_tables(self, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> tuple:
        return cos[pos.reshape(-1)], sin[pos.reshape(-1)]  # [positions, head_dim], row per position

    def rope_qk(self, qkv: torch.Tensor, tables: tuple, heads: int, kv_heads: int, head_dim: int):
        qkv = qkv.contiguous()
        lead = qkv.shape[:-1]
        self.ext.rope_(qkv.view(-1, qkv.shape[-1]), tables[0], tables[1], heads + kv_heads, head_dim)
        q = qkv[..., : heads * head_dim].view(*lead, heads, head_dim)
        k = qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].view(*lead, kv_heads, head_dim)
        return q, k

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.ext.silu_mul(gate_up.contiguous())

    def attend(
        self, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor], offsets: Sequence[int], starts: Sequence[int], counts: Sequence[int],
        out: torch.Tensor,
    ) -> None:
        """Causal attention of sequence i's rows qkv[offsets[i] : offsets[i] + counts[i]] (q | k
        | v, as rope_qk left them: rotated in place) at positions starts[i]..., against its
        cache keys[i], values[i] [kv_heads, capacity, head_dim], after writing their k and v
        there; into out [T, heads * head_dim]. Only blocks attends() takes; each output row is
        bit for bit the same whatever the other rows of the call (actors/csrc/layer_ops.cpp)."""
        if not all(self.attends(n, head_dim) for n in counts):
            raise ValueError(f"attend takes 1 to {self.attend_max_rows} rows a sequence of heads of a multiple of 16, "
                             f"got rows {list(counts)} of head_dim {head_dim}")
        self.ext.attend(qkv, heads, kv_heads, head_dim, list(keys), list(values), list(offsets), list(starts),
                        list(counts), out)


def for_runner(kernel: str, dtype: torch.dtype, device: torch.device, eps: float) -> TorchLayerOps:
    """The fused ops for a bf16 CPU runner on ggml's kernels (kernel "...-ggml") where the
    extension has them, else torch's."""
    if kernel.endswith("-ggml") and dtype == torch.bfloat16 and device.type == "cpu":
        from tandem.actors import ggml_kernel

        ext = ggml_kernel.load()
        if ext is not None and hasattr(ext, "rms_norm"):
            return FusedLayerOps(eps, ext)
    return TorchLayerOps(eps)
