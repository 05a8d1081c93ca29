// tandem's Q8_0 matmul on AVX-512 VNNI, or on AVX2 alone, for CPUs where ggml has no AMX
// layout (MIT, like ggml).
//
// ggml keeps a Q8_0 weight in plain rows there (no CPU_REPACK layout for Q8_0 on x86): one
// activation row runs its vec_dot per weight row, two and more run llamafile's tinyBLAS,
// 256 bits wide, on 4 x 4 tiles, and each further row costs nearly another whole pass.
// A pack's Q6_K linears and LM head are Q8_0 on ggml (actors/kernels.py), so on a 2-core AMD
// EPYC (AVX-512 VNNI, no AMX) a verification block of 5 rows cost 3.4 one-row steps (stop 42).
// Measured there (2026-12-06, 2 threads, ms at 1 / 2 / 4 / 5 / 8 rows, two runs), the 1.5B
// pack's Q8_0 LM head (151936 x 1536): ggml 8.7-10.4 / 19-20 / 23-24 / 41-43 / 33, this
// kernel (before its prefetch) 15-17 / 8-11 / 8-16 / 11-15 / 11-17; in a step of the pack at
// one row, with the prefetch, 9.9-10.7 against ggml's 10.2.
//
// Here the weight is repacked once into tiles of 16 output columns (pack): per block of 32
// weights, 16 x 32 bytes in VNNI order (4 consecutive weights of a column side by side) as
// unsigned bytes (w + 128), then the 16 columns' fp16 scales: 544 bytes, as many as ggml's
// 16 blocks. One vpdpbusd multiplies 4 weights of 16 columns by 4 activation bytes; the +128
// is taken out by starting each block's sum at -128 * (the block's activation sum). Each
// weight block is loaded once for up to 4 activation rows (kMaxRows), for 4 tiles at a time
// (a group, laid out block by block: vnni_tiles.h), so each thread reads one stream.
//
// Every output is computed with the same integer and float operations in the same order
// whatever the rows of the call (each row's block sums are exact integers; each output adds
// its blocks in order with one fma each), so a row of a verification block equals, bit for
// bit, that row computed alone (tests/unit/test_ggml_kernel.py). Activations are quantized
// by ggml's own Q8_0 quantizer, as ggml's matmul does. On AVX2 alone (2-core AMD EPYC Zen 3,
// 2026-12-07, 2 threads, ms at 1 / 4 / 8 rows, weights warm in cache): 1536 x 8960, these
// tiles 0.40 / 0.94 / 1.39, ggml's plain rows 0.57 / 1.51 / 2.61; an eighth of the LM head
// (18992 x 1536) 1.31 / 2.01 / 3.62 against 2.06 / 4.42 / 6.98.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "q8_rows.h"

namespace tandem_q8 {

namespace {
struct BlockQ8 {  // ggml's block_q8_0 (ggml-common.h): an fp16 scale and 32 signed weights
  uint16_t d;
  int8_t qs[kBlock];
};
static_assert(sizeof(BlockQ8) == 2 + kBlock, "block_q8_0 is 34 bytes");
}  // namespace

size_t packed_bytes(int64_t n, int64_t kb) { return (size_t)(n / kTileN) * (size_t)kb * kTileBlockBytes; }

void pack(const uint8_t* rows, int64_t n, int64_t kb, uint8_t* out) {
  const BlockQ8* w = reinterpret_cast<const BlockQ8*>(rows);
  for (int64_t t = 0; t < n / kTileN; ++t)
    for (int64_t i = 0; i < kb; ++i) {
      uint8_t* dst = out + tandem_tiles::offset(n / kTileN, kb, t, i, kTileBlockBytes);
      for (int c = 0; c < kTileN; ++c) {
        const BlockQ8& b = w[(t * kTileN + c) * kb + i];
        for (int k = 0; k < kBlock; ++k) dst[(k / 4) * (kTileN * 4) + c * 4 + k % 4] = (uint8_t)b.qs[k] ^ 0x80;
        std::memcpy(dst + kTileN * kBlock + c * 2, &b.d, 2);
      }
    }
}

void block_terms(const uint8_t* blocks, int64_t m, int64_t kb, float* ad, int32_t* acomp) {
  const BlockQ8* a = reinterpret_cast<const BlockQ8*>(blocks);
  for (int64_t j = 0; j < m * kb; ++j) {
    int32_t sum = 0;
    for (int k = 0; k < kBlock; ++k) sum += a[j].qs[k];
    acomp[j] = -128 * sum;
#if defined(__F16C__)
    ad[j] = _cvtsh_ss(a[j].d);
#else
    ad[j] = 0.0f;  // not reached: tandem_tiles::kAvailable is false without F16C
#endif
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
namespace {
// MR activation rows x COLS tiles (16 columns each) over all kb blocks.
template <int MR, int COLS>
void tiles(const Job& j, int64_t r0, int64_t t0, float* y) {
  const int64_t kb = j.kb;
  __m512 vc[MR][COLS];
  for (int m = 0; m < MR; ++m)
    for (int col = 0; col < COLS; ++col) vc[m][col] = _mm512_setzero_ps();
  for (int64_t i = 0; i < kb; ++i) {
    for (int col = 0; col < COLS; ++col) {
      const uint8_t* b = j.packed + tandem_tiles::offset(j.n / kTileN, kb, t0 + col, i, kTileBlockBytes);
      __m512i vb[8];
      for (int k = 0; k < 9; ++k) _mm_prefetch(reinterpret_cast<const char*>(b + k * 64 + tandem_tiles::kPrefetch), _MM_HINT_T0);
      for (int k = 0; k < 8; ++k) vb[k] = _mm512_loadu_si512(reinterpret_cast<const void*>(b + k * 64));
      const __m512 vd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kTileN * kBlock)));
      for (int m = 0; m < MR; ++m) {
        const int64_t at = (r0 + m) * kb + i;
        const int8_t* a = reinterpret_cast<const BlockQ8*>(j.blocks)[at].qs;  // 4 bytes at a time, unaligned
        __m512i s = _mm512_set1_epi32(j.acomp[at]);
        for (int k = 0; k < 8; ++k) {
          int32_t four;
          std::memcpy(&four, a + 4 * k, 4);
          s = _mm512_dpbusd_epi32(s, vb[k], _mm512_set1_epi32(four));
        }
        vc[m][col] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(vd, _mm512_set1_ps(j.ad[at])), vc[m][col]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int col = 0; col < COLS; ++col) _mm512_storeu_ps(y + (r0 + m) * j.n + (t0 + col) * kTileN, vc[m][col]);
}

}  // namespace
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
namespace {
// The same on AVX2 alone (no vpdpbusd): a tile's 16 columns as two halves of 8. maddubs needs
// one unsigned operand and saturates its pair sums in int16, so the packed (w + 128) bytes go
// back to w, and as in ggml's own AVX2 dot product |w| meets the activation byte with w's sign
// (|w|, |a| <= 127: ggml quantizes both to [-127, 127], pair sums at most 32258); one madd a
// group of 4 takes the pairs into int32, exact, so no -128 compensation is needed. The float
// operations per output are the same, in the same order, whatever the rows of the call.
template <int MR, int COLS>
void tiles(const Job& j, int64_t r0, int64_t t0, float* y) {
  const int64_t kb = j.kb;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 vc[MR][COLS][2];
  for (int m = 0; m < MR; ++m)
    for (int col = 0; col < COLS; ++col) vc[m][col][0] = vc[m][col][1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < kb; ++i) {
    for (int col = 0; col < COLS; ++col) {
      const uint8_t* b = j.packed + tandem_tiles::offset(j.n / kTileN, kb, t0 + col, i, kTileBlockBytes);
      for (int k = 0; k < 9; ++k) _mm_prefetch(reinterpret_cast<const char*>(b + k * 64 + tandem_tiles::kPrefetch), _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        __m256i s[MR];
        for (int m = 0; m < MR; ++m) s[m] = _mm256_setzero_si256();
        for (int k = 0; k < 8; ++k) {
          const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + k * 64 + h * 32)), flip);
          const __m256i aw = _mm256_abs_epi8(w);
          for (int m = 0; m < MR; ++m) {
            int32_t four;
            std::memcpy(&four, reinterpret_cast<const BlockQ8*>(j.blocks)[(r0 + m) * kb + i].qs + 4 * k, 4);
            const __m256i prod = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_set1_epi32(four), w));
            s[m] = _mm256_add_epi32(s[m], _mm256_madd_epi16(prod, ones));
          }
        }
        const __m256 vd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kTileN * kBlock + h * 16)));
        for (int m = 0; m < MR; ++m) {
          const int64_t at = (r0 + m) * kb + i;
          vc[m][col][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m]), _mm256_mul_ps(vd, _mm256_set1_ps(j.ad[at])), vc[m][col][h]);
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

}  // namespace tandem_q8
