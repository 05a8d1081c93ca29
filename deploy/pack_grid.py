"""The packs' own 4-bit grid, for serving a pack at 4 bits without re-quantizing (issue 10).

A GGUF Q4_K tensor stores super-blocks of 256 weights: an f16 scale d and minimum dmin, eight
6-bit sub-scales and sub-minimums (one per group of 32) and 4-bit codes q. A weight is
    w = (d * sc_g) * q - (dmin * m_g)
an affine grid per group of 32: exactly the layout of the runner's group-32 asymmetric int4
kernel (actors/kernels.py: (q - 8) * scale + zero, so zero = 8 * scale - min). This module
reads the Q4_K tensors of a pack's GGUF and writes, once per pack, `grid_q4k.safetensors`
beside the converted weights: per linear (by its transformers name) the codes (two per byte,
low nibble first: uint8 [out, in / 2]), the group scale and minimum (float32 [out, in / 32]),
and the GGUF's own Q4_K rows as stored (`rows`, uint8 [out, in / 256 * 144]) for ggml's
kernel (actors/ggml_kernel.py), which multiplies them without unpacking.
Decoding uses gguf-py's own unpacking of the sub-scales (Q4_K.get_scale_min), so only the
split of d * sc * q - dmin * m into its factors is written here. Tensors of other types
(Q6_K, Q5_0, Q8_0) are not in the file; the runner serves them as int8 or dense.

Only the composition root (deploy/) knows GGUF; actors/ receives the file's path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tandem.actors.kernels import PACK_GRID_FILE as GRID_FILE
from tandem.actors.kernels import PACK_GRID_FORMAT as GRID_FORMAT
GROUP = 32

# GGUF tensor names -> transformers names, for the linears of the llama/qwen2 families
# (transformers' own GGUF loader maps them the same way; qwen2 needs no q/k permutation).
_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def hf_linear_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; `output.weight` ->
    `lm_head.weight`; None for anything that is not a linear."""
    if gguf_name == "output.weight":
        return "lm_head.weight"
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LINEARS:
        return f"model.layers.{m.group(1)}.{_LINEARS[m.group(2)]}.weight"
    return None


def q4k_grid(blocks: np.ndarray, out_features: int, in_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw Q4_K rows (uint8 [out, in / 256 * 144]) -> (codes uint8 [out, in] in 0..15, scale
    float32 [out, in / 32], minimum float32 [out, in / 32]) with w = scale * q - minimum."""
    from gguf.quants import Q4_K

    b = blocks.reshape(-1, 144)  # one row per super-block of 256
    n = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(b[:, 4:16])  # [n, 8] each, 6-bit
    qs = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & np.uint8(0x0F)).reshape(out_features, in_features)
    scale = (d * sc.astype(np.float32)).reshape(out_features, in_features // GROUP)
    minimum = (dmin * m.astype(np.float32)).reshape(out_features, in_features // GROUP)
    return codes, scale, minimum


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 [out, in] codes 0..15 -> uint8 [out, in / 2], low nibble = even column."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def write_grid(gguf_path: Path, dest: Path) -> dict:
    """Extract every Q4_K linear of `gguf_path` into `dest` (safetensors); returns counts."""
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
        name = hf_linear_name(t.name)
        if name is None or t.tensor_type != gguf.GGMLQuantizationType.Q4_K:
            continue
        in_f, out_f = (int(x) for x in t.shape)
        codes, scale, minimum = q4k_grid(np.asarray(t.data), out_f, in_f)
        base = name[: -len(".weight")]
        tensors[f"{base}.codes"] = torch.from_numpy(pack_nibbles(codes))
        tensors[f"{base}.scale"] = torch.from_numpy(scale)
        tensors[f"{base}.min"] = torch.from_numpy(minimum)
        tensors[f"{base}.rows"] = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(out_f, -1))
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": GRID_FORMAT, "group": str(GROUP)})
    tmp.replace(dest)
    return {"q4k_linears": len(tensors) // 4, "gguf_types": kinds}


def join_pack_gguf(name: str, dest: Path) -> Path:
    """The pack's GGUF parts joined into one file at `dest` (what llama.cpp and gguf-py read)."""
    from tandem.deploy.packs import PACKS, pack_part_paths

    with open(dest, "wb") as out:
        for p in pack_part_paths(PACKS[name]):
            with open(p, "rb") as src:
                shutil.copyfileobj(src, out, 16 << 20)
    return dest


def grid_format(path: Path) -> str | None:
    """The format a grid file says it has (an older one is written again)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # a truncated or foreign file: write it again
        return None


def pack_grid_file(name: str) -> Path:
    """The grid file of pack `name`, written on first use (joins the pack's parts into a
    temporary GGUF, reads it, deletes it: tens of seconds)."""
    from tandem.deploy.packs import _log, materialize_pack

    folder = materialize_pack(name)
    dest = folder / GRID_FILE
    if dest.is_file() and grid_format(dest) == GRID_FORMAT:
        return dest
    t0 = time.time()
    _log(f"extracting the 4-bit grid of {name} from its GGUF once")
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        joined = join_pack_gguf(name, Path(tmp) / "model.gguf")
        info = write_grid(joined, dest)
    _log(f"{name}: {info['q4k_linears']} Q4_K linears in {time.time() - t0:.0f}s ({info['gguf_types']})")
    return dest


def _quantize(ref: str, setting: str | None, *, otherwise: str | None) -> str | None:
    """A runner's `quantize` from a user's setting: "auto" is "pack" for a model pack and
    `otherwise` for anything else; "none" (or nothing) is None."""
    from tandem.deploy.packs import PACKS

    if setting in (None, "", "none"):
        return None
    if setting == "auto":
        return "pack" if ref in PACKS else otherwise
    return setting


def target_quantize(ref: str, setting: str | None) -> str | None:
    """The runner's `quantize` for a target: "auto" is "pack" for a model pack (served at 4
    bits from its own grid; on a GPU the runner keeps it dense) and none for anything else."""
    return _quantize(ref, setting, otherwise=None)


def draft_quantize(ref: str, setting: str | None) -> str | None:
    """The runner's `quantize` for a draft: "auto" is "pack" for a model pack and int4 for
    anything else. A pack draft on its own grid runs on ggml's kernels, exactly the GGUF's
    weights: on the 0.5B draft (2-core EPYC, stop 47) 17.6 ms a step against 20.5 on int4
    (re-quantized from the dequantized weights), and it agreed more with the 1.5B target
    (accepted 2.7-3.1 tokens a round on code_dev against 2.3)."""
    return _quantize(ref, setting, otherwise="int4")


def resolver_for(resolve, quantize: str | None):
    """`resolve`, or for quantize "pack" a resolver that also makes sure a pack's grid file
    exists; picklable for Ray, so the grid is prepared on the node that loads the model."""
    return _GridResolver(resolve) if quantize == "pack" else resolve


class _GridResolver:
    def __init__(self, resolve):
        self.resolve = resolve

    def __call__(self, ref: str) -> str:
        from tandem.deploy.packs import PACKS

        if ref in PACKS:
            pack_grid_file(ref)
        return self.resolve(ref) if self.resolve is not None else ref
