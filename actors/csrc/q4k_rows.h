// tandem's Q4_K matmul on AVX-512 VNNI or AVX2 (q4k_rows.cpp says why and how); MIT, like ggml.
#pragma once

#include <cstddef>
#include <cstdint>

#include "vnni_tiles.h"

namespace tandem_q4k {

using tandem_tiles::kTileN;
constexpr int kSuper = 256;  // weights a Q4_K super-block holds (ggml's QK_K)
// a tile's super-block: 16 x 256 4-bit weights, 8 sub-block scales and mins a column (u8),
// the columns' fp16 d and dmin
constexpr int kQsBytes = kTileN * kSuper / 2;  // 2048
constexpr int kTileBlockBytes = kQsBytes + 2 * 8 * kTileN + 2 * 2 * kTileN;  // 2368

// n weight rows (a multiple of kTileN) of kb Q4_K super-blocks -> packed_bytes(n, kb) at `out`.
size_t packed_bytes(int64_t n, int64_t kb);
void pack(const uint8_t* rows, int64_t n, int64_t kb, uint8_t* out);

// per activation row and super-block (m * kb of them, ggml's Q8_K blocks): the 4 pairs of
// sub-block sums (int16 each, packed in an int32) the mins multiply
void pair_sums(const uint8_t* blocks, int64_t m, int64_t kb, int32_t* pairs);

struct Job {
  const uint8_t* packed;  // pack()'s output
  int64_t n, kb;          // weight rows (outputs) and super-blocks per row
  const uint8_t* blocks;  // the activations as ggml's Q8_K blocks [m, kb]
  const int32_t* pairs;   // pair_sums() [m, kb, 4]
  int64_t m;              // activation rows
};

// y[m, n]: thread ith of nth computes its share of the output columns.
void run(const Job& job, float* y, int ith, int nth);

}  // namespace tandem_q4k
