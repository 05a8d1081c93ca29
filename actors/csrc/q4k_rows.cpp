// tandem's Q4_K matmul on AVX-512 VNNI, or on AVX2 alone, for CPUs where ggml has no AMX
// layout (MIT, like ggml).
//
// Off AMX ggml interleaves Q4_K weights 8 rows at a time (CPU_REPACK): one activation row
// runs its gemv, four its gemm, which on the 2-core AMD EPYC costs nearly four gemvs (the
// 1.5B pack's Q4_K linears of a layer, 2 threads: 0.84 ms at 1 row, 1.50 at 2, 3.10 at 4 and
// at 5, 5.19 at 8). Here, as for Q8_0 (q8_rows.cpp), the weight is repacked once into tiles of
// 16 output columns, and each weight byte is loaded once for up to 4 activation rows.
//
// A tile's super-block (256 weights a column): the 16 columns' quant bytes in VNNI order,
// 64 bytes per 4 weights of a sub-block pair (byte c*4+kk = column c's qs[32p + 4g + kk]: its
// low nibble is weight 64p + 4g + kk of sub-block 2p, its high nibble the same of sub-block
// 2p+1, as Q4_K stores them); the 8 sub-block scales and mins of each column (6-bit, decoded
// once here); the columns' fp16 d and dmin: 2368 bytes against Q4_K's 2304. One vpdpbusd
// multiplies 4 weights of 16 columns (nibbles, unsigned) by 4 activation bytes (ggml's Q8_K);
// each sub-block's exact integer sum is scaled by its 6-bit scale in integers, as ggml's
// vec_dot does, and the mins meet the activation's sub-block sums (vpdpwssd) once a
// super-block. Every output takes the same operations in the same order whatever the rows of
// the call, so a row of a verification block equals, bit for bit, that row computed alone.
//
// On AVX2 alone (no VNNI; the AVX2 tiles below) ggml's own layouts either sum a block of rows
// in another order than one row (its 8-row interleave, its tiled matmul) or unpack each weight
// again for every row (plain rows, vec_dot). Measured on a 2-core AMD EPYC Zen 3 (AVX2 only,
// 2026-12-07, 2 threads, ms at 1 / 4 / 8 rows; micro-benchmark, weights warm in cache):
// 8960 x 1536 Q4_K, these tiles 0.24 / 0.70 / 1.42, plain rows 0.46 / 1.54 / 3.07, interleave
// 0.37 / 1.40 / 2.71; a step of the 1.5B pack (bench/kernel_tiles.py) 1 row 64.2 ms against
// 68.8 on ggml's layouts, 5 rows 112 against 196.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "q4k_rows.h"

namespace tandem_q4k {

namespace {
struct BlockQ4K {  // ggml's block_q4_K (ggml-common.h)
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qs[kSuper / 2];
};
static_assert(sizeof(BlockQ4K) == 144, "block_q4_K is 144 bytes");
struct BlockQ8K {  // ggml's block_q8_K
  float d;
  int8_t qs[kSuper];
  int16_t bsums[kSuper / 16];
};
static_assert(sizeof(BlockQ8K) == 292, "block_q8_K is 292 bytes");

// ggml's get_scale_min_k4: sub-block j's 6-bit scale and min
void scale_min(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
  }
}
constexpr int kScales = kQsBytes;                   // u8 [8 sub-blocks][16 columns]
constexpr int kMins = kScales + 8 * kTileN;         // u8 [4 pairs][16 columns][2]
constexpr int kD = kMins + 8 * kTileN;              // fp16 [16]
constexpr int kDmin = kD + 2 * kTileN;              // fp16 [16]
static_assert(kDmin + 2 * kTileN == kTileBlockBytes, "tile super-block layout");
}  // namespace

size_t packed_bytes(int64_t n, int64_t kb) { return (size_t)(n / kTileN) * (size_t)kb * kTileBlockBytes; }

void pack(const uint8_t* rows, int64_t n, int64_t kb, uint8_t* out) {
  const BlockQ4K* w = reinterpret_cast<const BlockQ4K*>(rows);
  for (int64_t t = 0; t < n / kTileN; ++t)
    for (int64_t i = 0; i < kb; ++i) {
      uint8_t* dst = out + tandem_tiles::offset(n / kTileN, kb, t, i, kTileBlockBytes);
      for (int c = 0; c < kTileN; ++c) {
        const BlockQ4K& b = w[(t * kTileN + c) * kb + i];
        for (int p = 0; p < 4; ++p)
          for (int g = 0; g < 8; ++g)
            std::memcpy(dst + (p * 8 + g) * 64 + c * 4, b.qs + 32 * p + 4 * g, 4);
        for (int j = 0; j < 8; ++j) {
          uint8_t sc, m;
          scale_min(j, b.scales, &sc, &m);
          dst[kScales + j * kTileN + c] = sc;
          dst[kMins + (j / 2) * 2 * kTileN + c * 2 + j % 2] = m;
        }
        std::memcpy(dst + kD + c * 2, &b.d, 2);
        std::memcpy(dst + kDmin + c * 2, &b.dmin, 2);
      }
    }
}

void pair_sums(const uint8_t* blocks, int64_t m, int64_t kb, int32_t* pairs) {
  const BlockQ8K* a = reinterpret_cast<const BlockQ8K*>(blocks);
  for (int64_t j = 0; j < m * kb; ++j)
    for (int p = 0; p < 4; ++p) {
      const int32_t lo = a[j].bsums[4 * p] + a[j].bsums[4 * p + 1];  // sub-block 2p (<= 32 x 127)
      const int32_t hi = a[j].bsums[4 * p + 2] + a[j].bsums[4 * p + 3];
      pairs[j * 4 + p] = (int32_t)(((uint32_t)(uint16_t)(int16_t)hi << 16) | (uint16_t)(int16_t)lo);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
namespace {
template <int MR, int COLS>
void tiles(const Job& j, int64_t r0, int64_t t0, float* y) {
  const int64_t kb = j.kb;
  const BlockQ8K* acts = reinterpret_cast<const BlockQ8K*>(j.blocks);
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 vc[MR][COLS];
  for (int m = 0; m < MR; ++m)
    for (int col = 0; col < COLS; ++col) vc[m][col] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kb; ++i) {
    const int32_t* a[MR];
    for (int m = 0; m < MR; ++m) a[m] = reinterpret_cast<const int32_t*>(acts[(r0 + m) * kb + i].qs);
    for (int col = 0; col < COLS; ++col) {
      const uint8_t* b = j.packed + tandem_tiles::offset(j.n / kTileN, kb, t0 + col, i, kTileBlockBytes);
      __m512i iacc[MR];
      for (int m = 0; m < MR; ++m) iacc[m] = _mm512_setzero_si512();
      for (int p = 0; p < 4; ++p) {
        __m512i slo[MR], shi[MR];
        for (int m = 0; m < MR; ++m) slo[m] = shi[m] = _mm512_setzero_si512();
        for (int g = 0; g < 8; ++g) {
          _mm_prefetch(reinterpret_cast<const char*>(b + (p * 8 + g) * 64 + tandem_tiles::kPrefetch), _MM_HINT_T0);
          const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(b + (p * 8 + g) * 64));
          const __m512i lo = _mm512_and_si512(v, low);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          for (int m = 0; m < MR; ++m) {
            slo[m] = _mm512_dpbusd_epi32(slo[m], lo, _mm512_set1_epi32(a[m][16 * p + g]));
            shi[m] = _mm512_dpbusd_epi32(shi[m], hi, _mm512_set1_epi32(a[m][16 * p + 8 + g]));
          }
        }
        const __m512i sc_lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kScales + 2 * p * kTileN)));
        const __m512i sc_hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kScales + (2 * p + 1) * kTileN)));
        for (int m = 0; m < MR; ++m)
          iacc[m] = _mm512_add_epi32(iacc[m], _mm512_add_epi32(_mm512_mullo_epi32(slo[m], sc_lo), _mm512_mullo_epi32(shi[m], sc_hi)));
      }
      const __m512 vd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kD)));
      const __m512 vdmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kDmin)));
      for (int m = 0; m < MR; ++m) {
        const int32_t* pairs = j.pairs + ((r0 + m) * kb + i) * 4;
        __m512i ms = _mm512_setzero_si512();
        for (int p = 0; p < 4; ++p)
          ms = _mm512_dpwssd_epi32(ms, _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kMins + p * 2 * kTileN))),
                                   _mm512_set1_epi32(pairs[p]));
        const __m512 da = _mm512_set1_ps(acts[(r0 + m) * kb + i].d);
        vc[m][col] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]), _mm512_mul_ps(vd, da), vc[m][col]);
        vc[m][col] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(ms), _mm512_mul_ps(vdmin, da), vc[m][col]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int col = 0; col < COLS; ++col) _mm512_storeu_ps(y + (r0 + m) * j.n + (t0 + col) * kTileN, vc[m][col]);
}

}  // namespace
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
namespace {
// The same on AVX2 alone (no vpdpbusd): a tile's 16 columns as two halves of 8 (one ymm of
// int32 or float each). maddubs multiplies a nibble (0..15) by an activation byte (-128..127)
// and adds pairs, at most 3840 in size, so the 8 groups of a sub-block pair add exactly in
// int16 (at most 30720); one madd then takes each column's two int16 sums times its 6-bit
// scale (repeated in both halves of the column's int32) into int32. The integer sums are
// exact as with VNNI, and the float operations per output are the same, in the same order,
// whatever the rows of the call.
template <int MR, int COLS>
void tiles(const Job& j, int64_t r0, int64_t t0, float* y) {
  const int64_t kb = j.kb;
  const BlockQ8K* acts = reinterpret_cast<const BlockQ8K*>(j.blocks);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 vc[MR][COLS][2];
  for (int m = 0; m < MR; ++m)
    for (int col = 0; col < COLS; ++col) vc[m][col][0] = vc[m][col][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < kb; ++i) {
    const int32_t* a[MR];
    for (int m = 0; m < MR; ++m) a[m] = reinterpret_cast<const int32_t*>(acts[(r0 + m) * kb + i].qs);
    for (int col = 0; col < COLS; ++col) {
      const uint8_t* b = j.packed + tandem_tiles::offset(j.n / kTileN, kb, t0 + col, i, kTileBlockBytes);
      for (int h = 0; h < 2; ++h) {
        __m256i iacc[MR];
        for (int m = 0; m < MR; ++m) iacc[m] = _mm256_setzero_si256();
        for (int p = 0; p < 4; ++p) {
          __m256i slo[MR], shi[MR];
          for (int m = 0; m < MR; ++m) slo[m] = shi[m] = _mm256_setzero_si256();
          for (int g = 0; g < 8; ++g) {
            if (h == 0) _mm_prefetch(reinterpret_cast<const char*>(b + (p * 8 + g) * 64 + tandem_tiles::kPrefetch), _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (p * 8 + g) * 64 + h * 32));
            const __m256i lo = _mm256_and_si256(v, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int m = 0; m < MR; ++m) {
              slo[m] = _mm256_add_epi16(slo[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(a[m][16 * p + g])));
              shi[m] = _mm256_add_epi16(shi[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(a[m][16 * p + 8 + g])));
            }
          }
          __m256i sc_lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + kScales + 2 * p * kTileN + h * 8)));
          __m256i sc_hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + kScales + (2 * p + 1) * kTileN + h * 8)));
          sc_lo = _mm256_or_si256(sc_lo, _mm256_slli_epi32(sc_lo, 16));
          sc_hi = _mm256_or_si256(sc_hi, _mm256_slli_epi32(sc_hi, 16));
          for (int m = 0; m < MR; ++m)
            iacc[m] = _mm256_add_epi32(iacc[m], _mm256_add_epi32(_mm256_madd_epi16(slo[m], sc_lo), _mm256_madd_epi16(shi[m], sc_hi)));
        }
        const __m256 vd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kD + h * 16)));
        const __m256 vdmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kDmin + h * 16)));
        for (int m = 0; m < MR; ++m) {
          const int32_t* pairs = j.pairs + ((r0 + m) * kb + i) * 4;
          __m256i ms = _mm256_setzero_si256();
          for (int p = 0; p < 4; ++p)
            ms = _mm256_add_epi32(ms, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kMins + p * 2 * kTileN + h * 16))),
                                                        _mm256_set1_epi32(pairs[p])));
          const __m256 da = _mm256_set1_ps(acts[(r0 + m) * kb + i].d);
          vc[m][col][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_mul_ps(vd, da), vc[m][col][h]);
          vc[m][col][h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_mul_ps(vdmin, da), vc[m][col][h]);
        }
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int col = 0; col < COLS; ++col)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(y + (r0 + m) * j.n + (t0 + col) * kTileN + h * 8, vc[m][col][h]);
}

}  // namespace
#endif

#if defined(TANDEM_TILES_ISA)  // either kernel above (vnni_tiles.h)
void run(const Job& j, float* y, int ith, int nth) {
  tandem_tiles::for_share(j.n, j.m, ith, nth, [&](auto mr, auto cols, int64_t r0, int64_t t) {
    tiles<decltype(mr)::value, decltype(cols)::value>(j, r0, t, y);
  });
}
#else
void run(const Job&, float*, int, int) {}  // not reached: tandem_tiles::kAvailable is false
#endif

}  // namespace tandem_q4k
