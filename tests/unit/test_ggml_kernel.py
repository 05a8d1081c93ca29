"""ggml's quantized matmul (actors/ggml_kernel.py, actors/csrc/ggml_linear.cpp): what it
computes against the weights ggml itself de-quantizes, within the error its 8-bit activations
allow (a bound derived below, with a negative control); rows computed alike whatever the
block size; GGUF Q4_K decoding equal to the pack grid's; builds for another CPU refused.
Runs where `make kernels` built ggml (make test builds it first); the build-status tests run
everywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem.actors import ggml_kernel

needs_ggml = pytest.mark.skipif(ggml_kernel.load() is None, reason=f"ggml kernels: {ggml_kernel.build_status()[1]}")
BLOCK = {"Q4_K": 256, "Q8_0": 32, "Q4_0": 32}  # activation block of each weight type's vec_dot type (Q8_K, Q8_0, Q8_0)


def activation_bound(x: torch.Tensor, w: torch.Tensor, block: int) -> torch.Tensor:
    """|y - x @ w^T| per output, when ggml quantizes each row of x in blocks of `block` to
    8 bits: a block's scale is amax / 127 and every element is rounded to the nearest step, so
    it moves by at most amax / 254; an output moves by at most the sum over blocks of that
    times the block's |w|, plus float32 accumulation error (1e-5 of sum |x| |w|)."""
    rows, k = x.shape
    step = x.abs().view(rows, k // block, block).amax(-1) / 254  # [rows, blocks]
    wabs = w.abs().view(w.shape[0], k // block, block).sum(-1)  # [out, blocks]
    return step @ wabs.t() + 1e-5 * (x.abs() @ w.abs().t())


def check(y, x, w, block) -> bool:
    return bool(((y - x @ w.t()).abs() <= activation_bound(x, w, block)).all())


@needs_ggml
@pytest.mark.parametrize("ggml_type,out_f,in_f", [("Q4_K", 64, 512), ("Q4_K", 12, 256), ("Q8_0", 40, 96)])
def test_matmul_within_the_activation_bound(ggml_type, out_f, in_f):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(out_f, in_f, generator=g) * 0.05
    rows = ggml_kernel.quantize_rows(w0, ggml_type)
    w = ggml_kernel.dequantize_rows(rows, ggml_type, in_f)  # the weights as served
    lin = ggml_kernel.GgmlLinear(rows, ggml_type, in_f)
    assert lin.out_features == out_f
    x = torch.randn(5, in_f, generator=g)
    y = lin(x)
    assert y.shape == (5, out_f) and y.dtype == torch.float32
    assert check(y, x, w, BLOCK[ggml_type])
    assert lin(x.bfloat16()).dtype == torch.bfloat16
    # control: the same check fires on a layout error (two rows of the interleave swapped, or
    # the halves of each block swapped, as a wrong nibble order would)
    assert not check(y, x, w[[1, 0, *range(2, out_f)]], BLOCK[ggml_type])
    half = w.view(out_f, -1, 2, 16)[:, :, [1, 0]].reshape(out_f, in_f)
    assert not check(y, x, half, BLOCK[ggml_type])


def cpu_has(flag: str) -> bool:
    return flag in Path("/proc/cpuinfo").read_text().split()


VNNI_CPU = all(cpu_has(f) for f in ("avx512f", "avx512bw", "avx512_vnni"))  # tandem's own tiles (actors/csrc/q8_rows.cpp)
# the layout tandem's own tiles take on this CPU (actors/csrc/vnni_tiles.h kIsa), or None
TILES = "VNNI" if VNNI_CPU else "AVX2" if all(cpu_has(f) for f in ("avx2", "fma", "f16c")) else None


@needs_ggml
def test_each_weight_takes_the_first_layout_that_fits_this_cpu(monkeypatch):
    """AMX (AMX-INT8 hosts; rows in multiples of 32), else tandem's own tiles (AVX-512 VNNI or
    AVX2; rows in multiples of 16), else plain rows; ggml's 8-row interleave (AVX2) only with
    TANDEM_GGML_TILES=ggml, since its rows do not compute as alone (next tests). Every layout
    computes within the activation bound."""
    amx, avx2 = cpu_has("amx_int8"), cpu_has("avx2")
    g = torch.Generator().manual_seed(5)
    tiles = TILES or "CPU"
    interleaved = "CPU_REPACK" if avx2 else "CPU"
    for tiles_switch, out_f, want in (("own", 64, "AMX" if amx else tiles), ("own", 48, tiles), ("own", 8, "CPU"),
                                      ("own", 12, "CPU"), ("ggml", 48, interleaved), ("ggml", 8, interleaved)):
        monkeypatch.setenv(ggml_kernel.TILES_SWITCH, tiles_switch)
        w0 = torch.randn(out_f, 256, generator=g) * 0.05
        rows = ggml_kernel.quantize_rows(w0, "Q4_K")
        lin = ggml_kernel.GgmlLinear(rows, "Q4_K", 256)
        assert lin.layout == want and lin.repacked == (want != "CPU"), (tiles_switch, out_f, lin.layout)
        x = torch.randn(9, 256, generator=g)
        assert check(lin(x), x, ggml_kernel.dequantize_rows(rows, "Q4_K", 256), BLOCK["Q4_K"])


AMX_AFTER_ONEDNN = """
import sys, torch
from tandem.actors import ggml_kernel
torch.set_num_threads(1)  # ggml computes on this thread, where oneDNN ran just before
w = torch.randn(256, 1536) * 0.05
lin = ggml_kernel.GgmlLinear(ggml_kernel.quantize_rows(w, "Q4_K"), "Q4_K", 1536)
assert lin.layout == "AMX", lin.layout
x = torch.randn(8, 1536)
want = lin(x)
a, b = torch.randn(64, 1536, dtype=torch.bfloat16), torch.randn(1536, 1536, dtype=torch.bfloat16)
for _ in range(5):
    torch.nn.functional.linear(a, b)  # bf16 on oneDNN, on AMX tiles it releases after
    assert torch.equal(lin(x), want)
print("ok")
"""


@needs_ggml
@pytest.mark.skipif(not cpu_has("amx_int8"), reason="no AMX-INT8 on this CPU")
def test_amx_matmuls_run_after_torch_released_the_tiles():
    """ggml's AMX kernels as `make kernels` patches them (deploy/ggml_build.py patch_amx) run
    on a thread where torch's oneDNN just used and released the AMX tiles, as a runner's
    prefill (dense bf16) and its next verification do. Measured without the patch's reload
    (ggml's once-per-thread configuration): the process dies of SIGILL at the first matmul
    after oneDNN's; without its other half (GCC 12's 8-byte ldtilecfg operand), of SIGSEGV
    at the first AMX matmul. A child process, so that a crash fails this test only."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", AMX_AFTER_ONEDNN], capture_output=True, text=True, timeout=120,
                          env={**os.environ, ggml_kernel.ENV_SWITCH: "on"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])


def test_a_crashed_child_fails_the_amx_check():
    """Control for the check above: a child that dies of SIGILL is seen as failed."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout.strip() != "ok"


def _released_amx_source() -> str:
    """A stand-in for ggml's mmq.cpp as released: the parts patch_amx edits, in order."""
    from tandem.deploy.ggml_build import _AMX_EDITS, _ROWS_ANCHOR, _ROWS_BRANCH_ANCHOR

    return ("inline void ggml_tile_config_init(void) {\n" + "".join(old for old, _ in _AMX_EDITS) + "}\n"
            + _ROWS_ANCHOR + "void ggml_backend_amx_mul_mat() {\n" + _ROWS_BRANCH_ANCHOR + "    }\n}\n")


def test_the_amx_patch_applies_once_and_refuses_other_source(tmp_path):
    from tandem.deploy.ggml_build import _AMX_EDITS, _AMX_FILE, _ROWS_BRANCH, patch_amx
    from tandem.actors.ggml_kernel import VNNI_ROWS

    path = tmp_path / "sdist" / "llama.cpp" / _AMX_FILE
    path.parent.mkdir(parents=True)
    original = _released_amx_source()
    path.write_text(original)
    src = tmp_path / "sdist" / "llama.cpp"
    patch_amx(src)
    once = path.read_text()
    assert all(old not in once and new in once for old, new in _AMX_EDITS)
    assert VNNI_ROWS.read_text() in once and once.index("namespace tandem_rows") < once.index(_ROWS_BRANCH)
    assert path.with_name(path.name + ".orig").read_text() == original  # kept for the next patch version
    patch_amx(src)
    assert path.read_text() == once  # idempotent
    # a file an older tandem patched, with no pristine copy and no sdist archive to take it from
    path.with_name(path.name + ".orig").unlink()
    with pytest.raises(RuntimeError, match="older tandem patch"):
        patch_amx(src)
    path.with_name(path.name + ".orig").write_text("inline void ggml_tile_config_init(void) { /* another version */ }\n")
    with pytest.raises(RuntimeError, match="not the one"):
        patch_amx(src)


@needs_ggml
@pytest.mark.skipif(not cpu_has("amx_int8"), reason="no AMX-INT8 on this CPU")
@pytest.mark.parametrize("ggml_type,out_f,in_f", [("Q4_K", 96, 512), ("Q4_K", 160, 256), ("Q8_0", 96, 96), ("Q8_0", 32, 1536), ("Q4_0", 96, 896)])
def test_a_few_rows_compute_each_row_as_one_row_does(ggml_type, out_f, in_f):
    """2..9 rows at once (Q8_0 and Q4_0: tandem's multi-row VNNI kernel up to its max_rows, 8,
    ggml's AMX kernel past it; Q4_K: tandem's AMX kernel, also for 16, 17 and 33 rows, one, two
    and three blocks of 16 rows; 96 and 160 outputs leave a part-filled last block of 4 tiles):
    every row's output equals, bit for bit, that row computed alone on ggml's one-row kernel,
    and stays within the activation bound of the served weights. Control: the rows computed
    alone in another order differ, so the equality is not one that any output meets."""
    g = torch.Generator().manual_seed(3)
    rows = ggml_kernel.quantize_rows(torch.randn(out_f, in_f, generator=g) * 0.05, ggml_type)
    w = ggml_kernel.dequantize_rows(rows, ggml_type, in_f)
    lin = ggml_kernel.GgmlLinear(rows, ggml_type, in_f)
    assert lin.layout == "AMX"
    for m in [*range(2, 10), *((16, 17, 33) if ggml_type == "Q4_K" else ())]:
        x = torch.randn(m, in_f, generator=g)
        y = lin(x)
        alone = torch.cat([lin(x[r:r + 1]) for r in range(m)])
        assert torch.equal(y, alone), (m, (y - alone).abs().max().item())
        assert check(y, x, w, BLOCK[ggml_type])
        assert not torch.equal(y, alone.flip(0))


@needs_ggml
@pytest.mark.skipif(TILES is None, reason="neither AVX-512 VNNI nor AVX2 on this CPU")
@pytest.mark.parametrize("ggml_type,out_f,in_f", [("Q8_0", 48, 96), ("Q8_0", 80, 1536), ("Q8_0", 112, 256),
                                                  ("Q4_K", 48, 256), ("Q4_K", 80, 1536), ("Q4_K", 112, 512)])
def test_weights_off_amx_run_on_tandems_own_tiles_each_row_as_alone(monkeypatch, ggml_type, out_f, in_f):
    """Q8_0 and Q4_K weights with outputs in multiples of 16 that ggml's AMX layout does not
    take (none on this CPU, or not a multiple of 32) run on tandem's own tiles, VNNI or AVX2
    (actors/csrc/q8_rows.cpp, q4k_rows.cpp; 48, 80 and 112 outputs: 3 tiles, a group of 4 and
    1, a group and 3). For 1-9 and 13 rows (chunks of 4 and a rest) every row equals, bit for
    bit, that row computed alone, stays within the activation bound of the served weights, and
    agrees with ggml's own matmul to float rounding (both sum the same exact block products).
    Controls: the rows alone in another order differ; TANDEM_GGML_TILES=ggml and 40 outputs
    keep ggml's layouts, and another value is refused by name."""
    g = torch.Generator().manual_seed(6)
    rows = ggml_kernel.quantize_rows(torch.randn(out_f, in_f, generator=g) * 0.05, ggml_type)
    w = ggml_kernel.dequantize_rows(rows, ggml_type, in_f)
    lin = ggml_kernel.GgmlLinear(rows, ggml_type, in_f)
    assert lin.layout == TILES and lin.repacked
    monkeypatch.setenv(ggml_kernel.TILES_SWITCH, "ggml")
    theirs = ggml_kernel.GgmlLinear(rows, ggml_type, in_f)
    assert theirs.layout not in ("VNNI", "AVX2")
    monkeypatch.setenv(ggml_kernel.TILES_SWITCH, "theirs")
    with pytest.raises(ValueError, match="TANDEM_GGML_TILES must be 'own' or 'ggml'"):
        ggml_kernel.GgmlLinear(rows, ggml_type, in_f)
    monkeypatch.delenv(ggml_kernel.TILES_SWITCH)
    assert ggml_kernel.GgmlLinear(ggml_kernel.quantize_rows(torch.randn(40, in_f, generator=g), ggml_type), ggml_type, in_f).layout not in ("VNNI", "AVX2")
    for m in [*range(1, 10), 13]:
        x = torch.randn(m, in_f, generator=g)
        y = lin(x)
        alone = torch.cat([lin(x[r:r + 1]) for r in range(m)])
        assert torch.equal(y, alone), (m, (y - alone).abs().max().item())
        assert check(y, x, w, BLOCK[ggml_type])
        assert (y - theirs(x)).abs().max() <= 1e-5 * y.abs().max()
        if m > 1:
            assert not torch.equal(y, alone.flip(0))
    # bf16 in and out, as the runner calls it
    xb = torch.randn(5, in_f, generator=g).bfloat16()
    assert torch.equal(lin(xb), lin(xb.float()).bfloat16())


@needs_ggml
def test_an_int4_head_runs_on_ggml_only_in_the_amx_layout(monkeypatch):
    """The 0.5B draft's LM head measured faster on ggml's Q4_0 than torch's int4 only in the AMX
    layout (actors/kernels.py make_linear); its layers go to ggml everywhere."""
    from tandem.actors.kernels import make_linear

    monkeypatch.setenv(ggml_kernel.ENV_SWITCH, "on")
    w = torch.randn(64, 256) * 0.05
    cpu = torch.device("cpu")
    head = make_linear(w, None, kernel="int4", dtype=torch.bfloat16, device=cpu, head=True)
    layer = make_linear(w, None, kernel="int4", dtype=torch.bfloat16, device=cpu)
    assert layer.kind == "ggml"
    if cpu_has("amx_int8"):
        assert head.kind == "ggml" and head.ggml.layout == "AMX"
    else:
        assert head.kind == "int4"
    odd = make_linear(torch.randn(48, 256) * 0.05, None, kernel="int4", dtype=torch.bfloat16, device=cpu, head=True)
    assert odd.kind == "int4"  # 48 rows: no AMX layout, so torch's int4 (a restricted head's case)


ROWS_ALONE = """
import sys, torch
from tandem.actors import ggml_kernel
ggml_type, out_f = sys.argv[1], int(sys.argv[2])
g = torch.Generator().manual_seed(2)
lin = ggml_kernel.GgmlLinear(ggml_kernel.quantize_rows(torch.randn(out_f, 512, generator=g) * 0.05, ggml_type), ggml_type, 512)
worst = 0.0
for m in (2, 4, 5, 8, 9, 16):
    x = torch.randn(m, 512, generator=g)
    block, alone = lin(x), torch.cat([lin(x[i : i + 1]) for i in range(m)])
    assert not torch.equal(block, alone.flip(0))  # control: not an equality any output meets
    worst = max(worst, (block - alone).abs().max().item())
print(lin.layout, worst)
"""


def rows_alone(ggml_type: str, out_f: int, **env) -> tuple[str, float]:
    """In a child process (ggml reads GGML_CPU_TILED_MM once per process): the layout of an
    out_f x 512 weight and the largest difference between a block of 2-16 rows and its rows
    computed one at a time."""
    import subprocess
    import sys

    child_env = {k: v for k, v in os.environ.items() if k not in ("GGML_CPU_TILED_MM", ggml_kernel.TILES_SWITCH)}
    proc = subprocess.run([sys.executable, "-c", ROWS_ALONE, ggml_type, str(out_f)], capture_output=True, text=True,
                          timeout=120, env={**child_env, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    layout, worst = proc.stdout.split()
    return layout, float(worst)


@needs_ggml
@pytest.mark.parametrize("ggml_type,out_f", [("Q4_K", 256), ("Q4_K", 250), ("Q8_0", 256), ("Q8_0", 250)])
def test_a_row_computes_alike_in_any_block(ggml_type, out_f):
    """A verification block of n rows computes each row bit for bit as the target's one-row
    step does, in whichever layout this CPU gives the weight (AMX as patched, tandem's VNNI or
    AVX2 tiles, or plain rows: 250 outputs fit no tile), so greedy verification cannot flip a
    near-tie that the target alone would not (tests/e2e/test_qwen_pack.py)."""
    layout, worst = rows_alone(ggml_type, out_f)
    assert worst == 0.0, (layout, worst)


@needs_ggml
@pytest.mark.skipif(not cpu_has("avx2"), reason="ggml's interleave and tiled matmul are AVX2 kernels")
def test_the_layouts_left_out_do_not_compute_rows_alike():
    """Controls for the test above, each showing the difference it rules out: ggml's 8-row
    interleave (TANDEM_GGML_TILES=ggml, on a CPU without AMX) sums one row (gemv) and four
    (gemm) in different orders, and so does ggml's tiled matmul for plain rows from 8 rows on
    when the extension leaves it on (GGML_CPU_TILED_MM=1, actors/csrc/ggml_linear.cpp
    init_once). Both stay within float32 summation error (1e-5 of the outputs)."""
    if not cpu_has("amx_int8"):
        layout, worst = rows_alone("Q4_K", 256, **{ggml_kernel.TILES_SWITCH: "ggml"})
        assert layout == "CPU_REPACK" and 0 < worst < 1e-3, (layout, worst)
    layout, worst = rows_alone("Q4_K", 250, GGML_CPU_TILED_MM="1")
    assert layout == "CPU" and 0 < worst < 1e-3, (layout, worst)


@needs_ggml
def test_q4k_decoding_equals_the_pack_grid():
    """ggml's Q4_K de-quantization of GGUF rows equals deploy/pack_grid.py's codes, scales and
    minimums (what the int4 kernel serves) to float32 rounding."""
    from tests.unit.test_pack_grid import random_q4k_rows

    from tandem.deploy.pack_grid import q4k_grid

    rng = np.random.default_rng(3)
    raw = random_q4k_rows(rng, 8, 512)
    codes, scale, minimum = q4k_grid(raw, 8, 512)
    grid_w = (codes.reshape(8, -1, 32) * scale[..., None] - minimum[..., None]).reshape(8, 512)
    ggml_w = ggml_kernel.dequantize_rows(torch.from_numpy(raw), "Q4_K", 512).numpy()
    assert np.allclose(ggml_w, grid_w, rtol=1e-6, atol=1e-7 * np.abs(grid_w).max())
    # control: rows of another tensor decode to something else
    other = random_q4k_rows(rng, 8, 512)
    assert not np.allclose(ggml_kernel.dequantize_rows(torch.from_numpy(other), "Q4_K", 512).numpy(), grid_w, rtol=1e-3)


def test_a_build_for_another_cpu_is_not_loaded_and_the_mode_decides_where_packs_use_ggml(monkeypatch, tmp_path):
    monkeypatch.setattr(ggml_kernel, "install_dir", lambda: tmp_path)
    assert ggml_kernel.build_status() == (False, "not built (`make kernels`)")
    (tmp_path / ggml_kernel.BUILD_INFO).write_text(json.dumps({"build_key": "another"}))
    ok, why = ggml_kernel.build_status()
    assert not ok and "another CPU" in why
    (tmp_path / ggml_kernel.BUILD_INFO).write_text(json.dumps({"build_key": ggml_kernel.build_key()}))
    assert ggml_kernel.build_status() == (True, str(tmp_path))  # control: the matching key passes
    for value, want in (("", "auto"), ("off", "off"), ("on", "on"), ("1", "on"), (" Auto ", "auto"), ("no", "off")):
        monkeypatch.setenv(ggml_kernel.ENV_SWITCH, value)
        assert ggml_kernel.mode() == want
    monkeypatch.setenv(ggml_kernel.ENV_SWITCH, "sometimes")
    with pytest.raises(ValueError, match="TANDEM_GGML must be one of auto, on, off"):
        ggml_kernel.mode()

    class Ext:
        amx = False

        def has_amx(self):
            return self.amx

    ext = Ext()
    monkeypatch.setattr(ggml_kernel, "load", lambda: ext)
    avx512 = "avx2 avx512_bf16 avx512_vnni avx512bw avx512f fma"
    for value, amx, flags, kernel, want in (
        ("auto", False, "avx2 fma", "pack", True),  # AVX2 alone: packs in plain rows on ggml
        ("auto", False, "avx2 fma", "int4", False),  # an int4 draft there: torch's (it gains nothing)
        ("auto", False, "sse4_2 fma", "pack", False),  # no AVX2: torch's kernels
        ("auto", False, avx512, "pack", True),  # a pack on AVX-512 VNNI: ggml (tandem's tiles)
        ("auto", False, avx512, "int4", False),
        ("auto", True, "avx2 fma", "int4", True),
        ("auto", True, "avx2 fma", "pack", True),
        ("on", False, "avx2 fma", "int4", True),
        ("off", True, avx512, "pack", False),
    ):
        monkeypatch.setenv(ggml_kernel.ENV_SWITCH, value)
        monkeypatch.setattr(ggml_kernel, "_cpu_flags", lambda flags=flags: flags)
        ext.amx = amx
        assert ggml_kernel.available(kernel) is want, (value, amx, flags, kernel)
    with pytest.raises(ValueError, match="kernel must be 'pack' or 'int4'"):
        ggml_kernel.available("int8")
    monkeypatch.setenv(ggml_kernel.ENV_SWITCH, "on")
    monkeypatch.setattr(ggml_kernel, "load", lambda: None)
    assert not ggml_kernel.available()  # switched on, not built: torch's kernels


def test_the_extensions_header_is_part_of_its_key(monkeypatch, tmp_path):
    """Changing a header of the extension's sources (actors/csrc/vnni_tiles.h: its tile and
    row constants) rebuilds the extension; control: the same text gives the same key."""
    key = ggml_kernel.build_key()
    copy = tmp_path / "vnni_tiles.h"
    copy.write_text(ggml_kernel.HEADERS[0].read_text())
    monkeypatch.setattr(ggml_kernel, "HEADERS", (copy, *ggml_kernel.HEADERS[1:]))
    assert ggml_kernel.build_key() == key
    copy.write_text(copy.read_text().replace("kMaxRows = 4", "kMaxRows = 8"))
    assert ggml_kernel.build_key() != key


def test_each_file_patched_into_ggml_is_part_of_its_key(monkeypatch, tmp_path):
    """A build is keyed by the kernels patched into ggml and by the branch that sends rows to
    them (actors/csrc/ggml_amx_branch.inc), so changing either rebuilds ggml; control: the same
    texts give the same key."""
    key = ggml_kernel.ggml_key()
    for name in ("VNNI_ROWS", "AMX_BRANCH"):
        copy = tmp_path / f"{name}.inc"
        copy.write_text(getattr(ggml_kernel, name).read_text())
        monkeypatch.setattr(ggml_kernel, name, copy)
        assert ggml_kernel.ggml_key() == key
        copy.write_text(copy.read_text() + "// changed\n")
        assert ggml_kernel.ggml_key() != key, name
        monkeypatch.undo()
    assert ggml_kernel.ggml_key() == key


def test_unknown_type_is_refused_by_name():
    with pytest.raises(ValueError, match="ggml_type must be one of"):
        ggml_kernel.GgmlLinear(torch.zeros(8, 144, dtype=torch.uint8), "Q3_X", 256)


@needs_ggml
def test_make_kernels_keeps_a_matching_build(capsys):
    from tandem.deploy.ggml_build import main

    assert main([]) == 0
    assert "up to date" in capsys.readouterr().err


@needs_ggml
def test_torch_runs_at_one_thread_while_ggml_has_the_threads():
    """torch_at_one_thread: torch's ops at one thread, ggml's matmuls at the count torch had;
    restored after, also on an error; nested uses keep the outer count."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ggml_kernel.torch_at_one_thread():
            assert torch.get_num_threads() == 1 and ggml_kernel._calls.threads == 2
            with ggml_kernel.torch_at_one_thread():
                assert torch.get_num_threads() == 1 and ggml_kernel._calls.threads == 2
            assert ggml_kernel._calls.threads == 2
        assert torch.get_num_threads() == 2 and not ggml_kernel._calls.threads
        with pytest.raises(KeyError):
            with ggml_kernel.torch_at_one_thread():
                raise KeyError("boom")
        assert torch.get_num_threads() == 2 and not ggml_kernel._calls.threads
    finally:
        torch.set_num_threads(before)


def test_one_llama_cpp_version_for_the_peer_and_the_kernels():
    """`make peer`'s shell default names the sdist actors/ggml_kernel.py builds ggml from."""
    script = (Path(__file__).resolve().parents[2] / "bench" / "build_llamacpp.sh").read_text()
    assert f"VERSION=${{LLAMACPP_BIN_VERSION:-{ggml_kernel.SDIST_VERSION}}}" in script


@needs_ggml
def test_threads_computing_at_once_on_the_shared_pool():
    """Two threads at once, one on the shared 2-thread pool and one switching between it and
    its own one-thread pool (ggml pauses a pool a backend leaves, so the switch waits for the
    pool's user): every result equals the one-thread result and both threads finish. A use
    check of the locking, not a proof: a race need not show in 120 calls."""
    import threading

    g = torch.Generator().manual_seed(4)
    rows = ggml_kernel.quantize_rows(torch.randn(256, 512, generator=g) * 0.05, "Q4_K")
    lin = ggml_kernel.GgmlLinear(rows, "Q4_K", 512)
    x = torch.randn(3, 512, generator=g)
    want = lin.impl.forward(x, 1)
    errors = []

    def work(counts):
        try:
            for n in counts:
                got = lin.impl.forward(x, n)
                if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()):
                    errors.append(n)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=([2] * 60,)), threading.Thread(target=work, args=([1, 2] * 30,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not errors
