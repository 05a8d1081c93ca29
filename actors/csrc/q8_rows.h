// tandem's Q8_0 matmul on AVX-512 VNNI or AVX2 (q8_rows.cpp says why and how); MIT, like ggml.
#pragma once

#include <cstddef>
#include <cstdint>

#include "vnni_tiles.h"

namespace tandem_q8 {

using tandem_tiles::kTileN;
constexpr int kBlock = 32;  // weights a Q8_0 block holds (ggml's QK8_0)
constexpr int kTileBlockBytes = kTileN * kBlock + kTileN * 2;  // 16 x 32 weights, 16 fp16 scales: 544

// n weight rows (a multiple of kTileN) of kb Q8_0 blocks each -> packed_bytes(n, kb) at `out`.
size_t packed_bytes(int64_t n, int64_t kb);
void pack(const uint8_t* rows, int64_t n, int64_t kb, uint8_t* out);

// m activation rows quantized by ggml to Q8_0 (m * kb blocks) -> each block's float scale and
// -128 x its sum, as run() reads them beside the blocks' bytes.
void block_terms(const uint8_t* blocks, int64_t m, int64_t kb, float* ad, int32_t* acomp);

struct Job {
  const uint8_t* packed;  // pack()'s output
  int64_t n, kb;          // weight rows (outputs) and blocks per row
  const uint8_t* blocks;  // the activations as ggml's Q8_0 blocks [m, kb]
  const float* ad;        // [m, kb]
  const int32_t* acomp;   // [m, kb]
  int64_t m;              // activation rows
};

// y[m, n] = the activations times the weight's rows: thread ith of nth computes its share of
// the output columns.
void run(const Job& job, float* y, int ith, int nth);

}  // namespace tandem_q8
