// The tile scheme tandem's own kernels share (q8_rows.cpp for Q8_0, q4k_rows.cpp for Q4_K, on
// AVX-512 VNNI or on AVX2; MIT, like ggml): a weight repacked into tiles of 16 output columns,
// 4 tiles a group, each group's tiles laid out block by block, and each thread's share of the
// groups computed for up to 4 activation rows a pass.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace tandem_tiles {

constexpr int kTileN = 16;      // output columns a tile holds: one zmm of int32 or float (two ymm)
constexpr int kGroupTiles = 4;  // tiles a thread takes at a time
// activation rows one pass over a group serves: 8 rows of the 1.5B's LM head took 16-22 ms in
// two passes of 4 rows at 4 tiles, 28-35 in one of 8 at one tile, 39-42 at two tiles, where
// 8 x 2 accumulators spill (2-core EPYC, 2026-12-06)
constexpr int kMaxRows = 4;
// how far ahead of its loads a thread prefetches its stream (the hardware's prefetch stops at
// each 4 KB page): the LM head at one row in a step of the 1.5B pack took 17.4 ms without,
// 9.9-10.7 with (ggml's 10.2); its Q4_K linears of a layer at one row, none 0.99-1.69 ms,
// 2048 bytes 0.89-1.18, 4096 0.83-1.25, 8192 1.00-1.03 (ggml's 0.78-1.18)
constexpr int kPrefetch = 4096;

// which kernels this build has: AVX-512 F, BW and VNNI ("VNNI"), else AVX2 with FMA and
// F16C ("AVX2": the same tiles, each 16 columns as two halves of 8), else none
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TANDEM_TILES_ISA 1  // for the kernels' own #if
constexpr const char* kIsa = "VNNI";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TANDEM_TILES_ISA 1
constexpr const char* kIsa = "AVX2";
#else
constexpr const char* kIsa = nullptr;
#endif
constexpr bool kAvailable = kIsa != nullptr;

// Where tile t's block i starts, blocks of block_bytes: the tiles of a group (fewer in the
// last) lie block by block side by side, so a thread reads its groups in one stream (4
// streams, one a tile, took 1.46-1.55 ms a layer of the 1.5B's Q4_K linears at one row,
// against 0.75-0.99 in one, on the 2-core EPYC).
inline size_t offset(int64_t n_tiles, int64_t kb, int64_t t, int64_t i, size_t block_bytes) {
  const int64_t g0 = t / kGroupTiles * kGroupTiles;
  const int64_t in_group = std::min<int64_t>(kGroupTiles, n_tiles - g0);
  return ((size_t)g0 * kb + (size_t)i * in_group + (size_t)(t - g0)) * block_bytes;
}

template <int COLS, class Tiles>
void with_rows(int rows, int64_t r0, int64_t t, Tiles& tiles) {
  using std::integral_constant;
  constexpr integral_constant<int, COLS> cols{};
  switch (rows) {
    case 1: return tiles(integral_constant<int, 1>{}, cols, r0, t);
    case 2: return tiles(integral_constant<int, 2>{}, cols, r0, t);
    case 3: return tiles(integral_constant<int, 3>{}, cols, r0, t);
    default: return tiles(integral_constant<int, 4>{}, cols, r0, t);
  }
}

// Thread ith of nth's share of n outputs (a multiple of kTileN) for m activation rows: calls
// tiles(MR, COLS, r0, t) (MR and COLS as std::integral_constant) for rows r0..r0+MR-1 of
// tiles t..t+COLS-1, a group's 4 tiles at once and a last group's rest one by one. The row
// chunks run inside a group, whose weights (609 KB of Q8_0 at k = 8960) stay in L2 across them.
template <class Tiles>
void for_share(int64_t n, int64_t m, int ith, int nth, Tiles&& tiles) {
  const int64_t n_tiles = n / kTileN;
  const int64_t groups = (n_tiles + kGroupTiles - 1) / kGroupTiles;
  const int64_t per = (groups + nth - 1) / nth;
  const int64_t begin = std::min<int64_t>(groups, per * ith), end = std::min<int64_t>(groups, begin + per);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t t0 = g * kGroupTiles, t_end = std::min<int64_t>(n_tiles, t0 + kGroupTiles);
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const int rows = (int)std::min<int64_t>(kMaxRows, m - r0);
      int64_t t = t0;
      for (; t + kGroupTiles <= t_end; t += kGroupTiles) with_rows<kGroupTiles>(rows, r0, t, tiles);
      for (; t < t_end; ++t) with_rows<1>(rows, r0, t, tiles);
    }
  }
}

}  // namespace tandem_tiles
