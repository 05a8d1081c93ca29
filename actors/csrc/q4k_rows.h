// tandem's Q4_K matmul on AVX-512 VNNI (q4k_rows.cpp says why and how); MIT, like ggml.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tandem_q4k {

constexpr int kTileN = 16;   // output columns a tile holds: one zmm of int32 or float
constexpr int kSuper = 256;  // weights a Q4_K super-block holds (ggml's QK_K)
// a tile's super-block: 16 x 256 4-bit weights, 8 sub-block scales and mins a column (u8),
// the columns' fp16 d and dmin
constexpr int kQsBytes = kTileN * kSuper / 2;  // 2048
constexpr int kTileBlockBytes = kQsBytes + 2 * 8 * kTileN + 2 * 2 * kTileN;  // 2368
constexpr int kGroupTiles = 4;  // tiles a thread takes at a time
constexpr int kMaxRows = 4;     // activation rows one pass over a tile group serves

// Where tile t's block i starts: the tiles of a group of kGroupTiles (fewer in the last)
// lie block by block side by side, so a thread reads its groups in one stream (4 streams,
// one per tile, took 1.46-1.55 ms a layer of the 1.5B's Q4_K linears at one row, against
// 0.75-0.99 in one, on the 2-core EPYC).
inline size_t offset(int64_t n_tiles, int64_t kb, int64_t t, int64_t i) {
  const int64_t g0 = t / kGroupTiles * kGroupTiles;
  const int64_t in_group = n_tiles - g0 < kGroupTiles ? n_tiles - g0 : kGroupTiles;
  return ((size_t)g0 * kb + (size_t)i * in_group + (size_t)(t - g0)) * kTileBlockBytes;
}

bool available();  // compiled with AVX-512 F, BW and VNNI

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
