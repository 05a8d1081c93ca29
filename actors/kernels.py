"""Linear kernels of the runner, chosen per device: dense (bf16/fp32) everywhere, and
weight-only int8 (per output channel) or int4 (groups of 32, scale and zero per group) where
they measure faster.

Which kernel, and why (`linear_kernel`):
- CPU, quantize int8 / int4: torch's own packed kernels (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`). Decoding on a CPU is memory bound, so fewer weight bytes
  is less time: per matmul at one token, int8 ran 1.7-3x and int4 about 2.4x faster than
  bf16 here. These are private ops; torchao's CPU int4 weight-only path dispatches to the
  same op, so using it directly saves a dependency and a tensor-subclass layer per call
  (the per-layer dispatch overhead is what the draft's step is short of; issue 10).
  The packed kernels are slow for many rows, so a block of more than `max_rows` rows (a
  prefill) uses the dense weight. Where the two cross depends on the CPU: with avx512_bf16 a
  dense bf16 matmul of 9+ rows beats the packed kernel; without it (an AVX2-only host) bf16
  is emulated and the packed kernel stays faster to 100+ rows; ggml's kernels (below) stay
  faster to 32-64 rows on a 2-core AMX-INT8 host at 2 threads. So each runner measures the
  crossover at load (`measure_quant_max_rows`) instead of assuming it; it only ever raises
  the bound above QUANT_MAX_ROWS (see choose_quant_max_rows).
- CPU, with ggml built (`make kernels`) and serving (TANDEM_GGML: by default where ggml has
  its AMX layout, and for packs wherever the CPU has AVX2; see actors/ggml_kernel.py): quantize pack runs the pack's Q4_K linears on
  ggml's own kernel straight from the GGUF's rows (8-bit activations) and its other linears as
  ggml Q8_0 ("pack-ggml"); int4 runs the layers as ggml Q4_0, and the LM head too in the AMX
  layout ("int4-ggml"). Otherwise the grid runs on torch's int4 kernel and the rest int8 ("pack").
- CUDA: dense in the compute dtype (bf16) for every linear, quantize or not. On a GPU the
  draft's step is launch-bound, not weight-bandwidth-bound, at these sizes; an int4/int8
  GPU kernel is not used until it is measured faster on one (no GPU was lent to measure it;
  the runner reports the kernel it chose, `ModelRunner.kernel`).
Only drafts are quantized by default: a draft may compute any q, as long as q is what it
sampled from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tandem.actors import ggml_kernel

QUANTIZE_CHOICES = ("none", "int8", "int4", "pack")


def linear_kernel(device: torch.device, quantize: str | None) -> str:
    """The kernel a runner on `device` uses for `quantize`: "dense", "int8", "int4" or
    "pack" (the model folder's own 4-bit grid, deploy/pack_grid.py: on ggml's kernel where
    ggml serves packs, else torch's int4 kernel; its other linears ggml Q8_0, else int8)."""
    if quantize in (None, "none"):
        return "dense"
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    return quantize if device.type == "cpu" else "dense"


class DenseLinear:
    """y = x W^T + b with W kept in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight = weight.contiguous()  # [out, in]
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantLinear:
    """Weight-only quantized linear on the CPU: int8 (per output channel) or int4 (groups of
    32 along the input, scale and zero per group); the dense weight serves blocks of more
    than `max_rows` rows (QUANT_MAX_ROWS until the runner measured its own crossover)."""

    QUANT_MAX_ROWS = 8
    INT4_GROUP = 32
    max_rows = QUANT_MAX_ROWS

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, kind: str, dtype: torch.dtype):
        if weight.device.type != "cpu":
            raise ValueError(f"QuantLinear runs on the CPU, got a weight on {weight.device}")
        self.dense = DenseLinear(weight.to(dtype), bias)
        self.bias = bias
        self.kind = kind
        w = weight.float()
        out_f, in_f = w.shape
        if kind == "int8":
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
            self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scale = scale.to(dtype)
        elif kind == "int4":
            gs = self.INT4_GROUP
            if in_f % gs:
                raise ValueError(f"int4 needs input features divisible by {gs}, got {in_f}")
            wg = w.view(out_f, in_f // gs, gs)  # [out, groups, gs]
            lo, hi = wg.amin(-1), wg.amax(-1)  # [out, groups]
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
            self._pack_int4(q.view(out_f, in_f), scale, -lo, dtype)
        else:
            raise ValueError(f"quantize must be 'int8' or 'int4', got {kind!r}")

    @classmethod
    def from_grid(
        cls, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bias: torch.Tensor | None, *, dense: torch.Tensor,
        dtype: torch.dtype, rows: torch.Tensor | None = None,
    ) -> "QuantLinear":
        """int4 from a given group-32 affine grid (w = scale * q - minimum per group; codes
        [out, in] in 0..15, scale and minimum [out, in / 32]) instead of quantizing a dense
        weight: a pack's own Q4_K grid is served as stored, up to the scales' rounding to the
        compute dtype. With the GGUF's Q4_K `rows` where ggml serves packs (built and chosen
        by TANDEM_GGML, actors/ggml_kernel.available), ggml's kernel serves them as stored instead (kind
        "ggml"). `dense` is the same grid
        dequantized, for blocks of many rows."""
        out_f, in_f = codes.shape
        if scale.shape != (out_f, in_f // cls.INT4_GROUP) or minimum.shape != scale.shape:
            raise ValueError(f"grid scale/minimum must be [{out_f}, {in_f // cls.INT4_GROUP}], got {tuple(scale.shape)}")
        if rows is not None and ggml_kernel.available("pack"):
            return cls.on_ggml(rows, "Q4_K", bias, dense=dense, dtype=dtype)
        self = cls.__new__(cls)
        self.dense = DenseLinear(dense.to(dtype), bias)
        self.bias = bias
        self.kind = "int4"
        self._pack_int4(codes, scale, minimum, dtype)
        return self

    @classmethod
    def on_ggml(cls, rows: torch.Tensor, ggml_type: str, bias: torch.Tensor | None, *, dense: torch.Tensor, dtype: torch.dtype) -> "QuantLinear":
        """Rows in a GGUF format (`ggml_type`, uint8 [out, row bytes]) on ggml's kernel (kind
        "ggml", actors/ggml_kernel.py); `dense`, the same weights de-quantized, serves blocks of
        more than max_rows rows."""
        self = cls.__new__(cls)
        self.dense = DenseLinear(dense.to(dtype), bias)
        self.bias = bias
        self.kind = "ggml"
        self.ggml = ggml_kernel.GgmlLinear(rows, ggml_type, dense.shape[1])
        return self

    def _pack_int4(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype) -> None:
        """The CPU kernel's operands for w = scale * q - minimum per group (codes [out, in]
        in 0..15; scale, minimum [out, in / 32])."""
        self.qweight = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        zero = 8 * scale.float() - minimum.float()  # the kernel computes (q - 8) * scale + zero
        self.scales_zeros = torch.stack([scale.float().t(), zero.t()], dim=-1).to(dtype).contiguous()  # [groups, out, 2]

    @property
    def weight(self) -> torch.Tensor:
        return self.dense.weight

    @property
    def out_features(self) -> int:
        return self.dense.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        return self.dense(x) if rows > self.max_rows else self.quantized(x)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized kernel whatever the rows (what __call__ runs up to max_rows)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kind == "ggml":
            y = self.ggml(x2)
        elif self.kind == "int8":
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.qweight, self.INT4_GROUP, self.scales_zeros)
        y = y.reshape(*shape[:-1], -1)
        return y + self.bias if self.bias is not None else y


class ConcatLinear:
    """Linears side by side (their outputs concatenated): a fused projection whose parts use
    different kernels (a pack's Q4_K q/k beside a Q6_K v)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.bias = None if all(p.bias is None for p in parts) else True

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([p.weight for p in self.parts], dim=0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def make_linear(weight, bias, *, kernel: str, dtype: torch.dtype, device: torch.device, head: bool = False):
    """A linear layer on `device` from (CPU) weights with the kernel `linear_kernel` chose
    ("pack" here: a linear that is not in the grid (Q6_K in the GGUF, the LM head), served as
    ggml's Q8_0 where ggml serves packs, else int8 per channel; "int4" there: ggml's Q4_0,
    for the LM head (`head`) only in ggml's AMX layout)."""
    if kernel in ("pack", "int4") and ggml_kernel.available(kernel):
        # pack: Q8_0 (a scale per 32 weights) measured no slower than torch's int8 at 1-8 rows
        # and faster than ggml's own Q6_K from 2 rows on (on AMX too: 7.9 against 16.1 ms for
        # the 1.5B's 151936 x 1536 head at 1 row); int4: Q4_0, which beat torch's int4 on the
        # 0.5B draft's layers (0.29 against 0.44 ms for 9728 x 896) everywhere, but on its LM
        # head (151936 x 896) only in ggml's AMX layout (1.6 against 3.4 ms at 1 row, 2
        # threads; 10.9 against 7.5 without AMX), so an int4 head stays on torch's int4 elsewhere
        ggml_type = "Q8_0" if kernel == "pack" else "Q4_0"
        rows = ggml_kernel.quantize_rows(weight.detach(), ggml_type)
        linear = QuantLinear.on_ggml(rows, ggml_type, bias.detach().to(dtype) if bias is not None else None, dense=weight.detach(), dtype=dtype)
        if kernel == "pack" or not head or linear.ggml.layout == "AMX":
            return linear
    weight = weight.detach().to(device=device, dtype=dtype)
    bias = bias.detach().to(device=device, dtype=dtype) if bias is not None else None
    if kernel == "dense":
        return DenseLinear(weight, bias)
    return QuantLinear(weight, bias, kind="int8" if kernel == "pack" else kernel, dtype=dtype)


PACK_GRID_FILE = "grid_q4k.safetensors"  # written by deploy/pack_grid.py beside a pack's weights
PACK_GRID_FORMAT = "tandem-q4k-grid-2"  # 2: with the GGUF's own Q4_K rows; older files are written again


class PackGrid:
    """A model folder's 4-bit grid file: per linear (transformers name without `.weight`)
    `codes` (uint8 [out, in / 2], two 4-bit codes per byte, low nibble first), `scale` and
    `min` (float32 [out, in / 32]); w = scale * code - min per group of 32; `rows`, the same
    weights as the GGUF stores them (Q4_K super-blocks, for ggml's kernel)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(path, "pt", device="cpu")
        self._names = set(self._file.keys())

    def linear(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(codes uint8 [out, in] in 0..15, scale, min) of linear `name`, or None when the
        pack stores it in another format."""
        if f"{name}.codes" not in self._names:
            return None
        packed = self._file.get_tensor(f"{name}.codes")  # [out, in / 2]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
        return codes, self._file.get_tensor(f"{name}.scale"), self._file.get_tensor(f"{name}.min")

    def rows(self, name: str) -> torch.Tensor | None:
        """The GGUF's own Q4_K rows of linear `name` (uint8 [out, in / 256 * 144]), or None."""
        return self._file.get_tensor(f"{name}.rows") if f"{name}.rows" in self._names else None


def open_pack_grid(model_path: str) -> PackGrid:
    from pathlib import Path

    path = Path(model_path) / PACK_GRID_FILE
    if not path.is_file():
        raise ValueError(
            f"quantize: 'pack' serves a model pack's own 4-bit grid, and {model_path!r} has no {PACK_GRID_FILE} "
            "(packs get it from tandem on first use; other models take none, int8 or int4)"
        )
    return PackGrid(str(path))


CROSSOVER_ROWS = (16, 32, 64, 128, 256)  # row counts tried by measure_quant_max_rows


def choose_quant_max_rows(quant_s: dict[int, float], dense_s: dict[int, float]) -> int:
    """The most rows up to which the quantized kernel was measured no slower than the dense
    weight at every row count tried, and never fewer than QUANT_MAX_ROWS: verification
    blocks of up to that many rows run the kernel a single-row step runs, so a verified
    block computes what the target's own one-token steps compute (lossless w.r.t. the
    target as served; the two kernels round differently)."""
    best = QuantLinear.QUANT_MAX_ROWS
    for rows in sorted(quant_s):
        if quant_s[rows] > dense_s[rows]:
            break
        best = rows
    return best


def measure_quant_max_rows(
    forward: Callable[[int], object], set_bound: Callable[[int], None], *, rows=CROSSOVER_ROWS, reps: int = 5
) -> int:
    """Time `forward(r)` (r rows through some of a runner's layers) with the quantized kernels
    serving the r rows (`set_bound(r)`) against the dense weights serving them
    (`set_bound(QUANT_MAX_ROWS)`), stopping at the first row count the dense weights win; the
    crossover as choose_quant_max_rows reads it. Leaves the bound wherever it was last set.

    Whole layers, not a linear alone: on ggml's kernels the norms, rotary and gate between the
    linears run on ggml's threads too, and a dense matmul right after them runs slower than
    alone (the 0.5B draft's 9728 x 896 linear alone: 0.7 ms at 32 rows in some calls, 7-8 ms
    in most). Each rep times both sides one right after the other, and each side keeps its
    median rep, as a runner calibrates while the other actors load beside it. The best of 2
    reps on the largest linear alone, which this replaced, read 8-32 rows on a 2-core AMX-INT8
    host where blocks of 9-48 rows ran 1.3-3.2x faster on ggml's kernels than on the dense
    weights (bench/results/packed_rows_amx_*.json; docs/deploy.md, stop 38)."""
    import statistics
    import time

    def timed(bound: int, r: int) -> float:
        set_bound(bound)
        t0 = time.perf_counter()
        forward(r)
        return time.perf_counter() - t0

    quant_s: dict[int, float] = {}
    dense_s: dict[int, float] = {}
    for r in rows:
        timed(r, r), timed(QuantLinear.QUANT_MAX_ROWS, r)  # warm-up
        q, d = [], []
        for _ in range(reps):
            q.append(timed(r, r))
            d.append(timed(QuantLinear.QUANT_MAX_ROWS, r))
        quant_s[r], dense_s[r] = statistics.median(q), statistics.median(d)
        if quant_s[r] > dense_s[r]:
            break
    return choose_quant_max_rows(quant_s, dense_s)
