"""One sequence's block through a runner's decoder layers as a plain loop of C++ calls.

Where every linear of a runner's layers runs on ggml's kernels and its small ops are the
fused C++ ones (a pack served in bf16 on the CPU: actors/ggml_kernel.py, actors/layer_ops.py
FusedLayerOps), a forward of one sequence's block (a decode step, a verification block, a
draft step) is ~9 C++ calls a layer. The runner's general forward reaches each through
several Python frames (QuantLinear -> GgmlLinear -> the extension, ConcatLinear, the ops'
wrappers, lists built per call for batches of many sequences). Here each layer's calls are
bound once at load and called directly, in the same order on the same operands, so every
value is bit for bit the general forward's (tests/runtime/test_lean_layers.py).

Measured on a 2-core AMD EPYC (AVX-512 VNNI, no AMX), 2 threads, one row against 150 cached
keys, 10 interleaved rounds of 20 steps: the 1.5B pack 34.5 against 37.9 ms a step, the 0.5B
21.1 against 22.4 (medians); in-process `ar` 1.005-1.025x and `sd` 1.06x, with the same output
(bench/results/stop48, lean_*).

Blocks of several sequences (a batch of requests) keep the general forward: there the
per-call overhead is shared by every sequence's rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tandem.actors.kernels import ConcatLinear, QuantLinear


def _bound(linear: Any) -> list[tuple[Any, torch.Tensor | None]] | None:
    """[(the extension's forward, bias or None)] per part of a linear whose parts all run on
    ggml's kernel; None otherwise (a dense or torch-quantized part)."""
    parts = linear.parts if isinstance(linear, ConcatLinear) else [linear]
    out = []
    for p in parts:
        if not isinstance(p, QuantLinear) or p.kind != "ggml":
            return None
        out.append((p.ggml.impl.forward, p.bias))
    return out


def _apply(parts: list[tuple[Any, torch.Tensor | None]], x: torch.Tensor, threads: int) -> torch.Tensor:
    """A bound linear on x [n, in], as QuantLinear (+ bias) and ConcatLinear compute it."""
    ys = []
    for forward, bias in parts:
        y = forward(x, threads)
        ys.append(y if bias is None else y + bias)
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


class LeanLayers:
    """A runner's layers bound for one-sequence blocks. `of(runner)` is None where some
    linear or op is not a C++ call (the general forward then serves every block)."""

    def __init__(self, ext: Any, layers: list[tuple], quant: Sequence[QuantLinear], eps: float):
        self.ext = ext
        self.eps = eps
        self.layers = layers  # per layer: bound qkv, o, gate_up, down, then input and post norm weights
        self._quant = list(quant)  # their max_rows: the dense weights serve longer blocks

    @classmethod
    def of(cls, runner: Any) -> "LeanLayers | None":
        ops = runner.ops
        if getattr(ops, "name", "") != "fused" or not getattr(ops, "attend_max_rows", 0):
            return None
        layers, quant = [], []
        for layer in runner.layers:
            linears = (layer.qkv, layer.o, layer.gate_up, layer.down)
            bound = [_bound(m) for m in linears]
            if any(b is None for b in bound):
                return None
            layers.append((*bound, layer.input_norm, layer.post_norm))
            quant += [p for m in linears for p in getattr(m, "parts", [m])]
        return cls(ops.ext, layers, quant, runner.eps)

    def takes(self, rows: int) -> bool:
        """Whether every linear runs a block of `rows` rows on its quantized kernel (the
        general forward hands longer blocks to the dense weights)."""
        return all(rows <= q.max_rows for q in self._quant)

    def run(
        self, x: torch.Tensor, lo: int, hi: int, *, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
        start: int, rope: tuple[torch.Tensor, torch.Tensor], heads: int, kv_heads: int, head_dim: int, threads: int,
    ) -> torch.Tensor:
        """x [n, hidden] (the block's rows at layer lo) -> [n, hidden] at layer hi; writes
        the rows' keys and values at positions start.. of keys[l], values[l]. The same calls
        as the runner's general forward (_run_layers_padded with one sequence)."""
        ext, eps = self.ext, self.eps
        rms, add_rms, rope_, silu_mul, attend = ext.rms_norm, ext.add_rms_norm, ext.rope_, ext.silu_mul, ext.attend
        cos, sin = rope
        n = x.shape[0]
        h = rms(x, self.layers[lo][4], eps)
        for li in range(lo, hi):
            qkv_parts, o, gate_up, down, _, post_norm = self.layers[li]
            qkv = _apply(qkv_parts, h, threads)
            rope_(qkv, cos, sin, heads + kv_heads, head_dim)
            att = torch.empty(n, heads * head_dim, dtype=x.dtype, device=x.device)
            attend(qkv, heads, kv_heads, head_dim, [keys[li]], [values[li]], [0], [start], [n], att)
            x, h = add_rms(x, _apply(o, att, threads), post_norm, eps)
            delta = _apply(down, silu_mul(_apply(gate_up, h, threads)), threads)
            if li + 1 < hi:
                x, h = add_rms(x, delta, self.layers[li + 1][4], eps)
            else:
                x = x + delta
        return x
