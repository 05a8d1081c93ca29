// The small per-layer ops of a bf16 decoder forward (RMSNorm, residual add + RMSNorm, rotary
// embedding, SiLU-gate) as single C++ calls, for the runner on ggml's kernels
// (actors/layer_ops.py says when they run). Measured on the 1.5B pack at 2 threads (Xeon,
// AMX): a one-token step spent ~10.5 of its ~67 ms outside ggml's matmuls, in ~45 torch ops
// a layer dispatched from Python at 2-5 us each (RMSNorm alone, 8 ops: 42 us a call, 2.4 ms a
// step). Each op here is one call and rounds to bf16 exactly where the torch ops it replaces
// do (the rotary: x*cos and rot*sin each rounded, then their sum), so the two differ at most
// where float sums are taken in another order (the RMS mean) or exp differs by an ulp (SiLU).
//
// Every tensor is bf16, on the CPU, contiguous, rows of the last dimension; the caller
// (actors/layer_ops.py) checks that and uses torch otherwise.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// bf16 <-> float as plain integer code that the compiler vectorises (-O3 -march=native): a
// loop over c10::BFloat16's constructor stays scalar, and one over 17,920 outputs (the 1.5B
// pack's gate/up at one row) took longer than torch's vectorised .to(). Round to nearest even,
// NaN kept a (quiet) NaN, as c10 does.
void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, 4);
  }
}

void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    uint32_t u;
    std::memcpy(&u, src + i, 4);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
  }
}

namespace {
using bf16 = c10::BFloat16;

// exp(x) in float to ~1 ulp (Cephes' expf: range reduction by ln 2, degree-6 polynomial), in
// code the compiler vectorises (with -fno-trapping-math); std::exp stays a scalar call (a SiLU over 8,960 gates took 55
// us). Where it differs from torch's exp by an ulp, a SiLU's bf16 rounding can differ.
inline float exp_vec(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.3762626647949f ? 88.3762626647949f : x);
  float fx = x * 1.44269504088896341f;
  int32_t ni = static_cast<int32_t>(fx + (fx >= 0.f ? 0.5f : -0.5f));  // nearest (std::floor stays scalar)
  float n = static_cast<float>(ni);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t e = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, 4);
  return p * scale;
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16 && t.is_contiguous(), name,
              " must be a contiguous bf16 CPU tensor");
}

// one row: y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), float statistics (as the runner's
// torch _rms: x.float(), normalise, .to(bf16), times the bf16 weight)
inline void rms_row(const bf16* x, const bf16* w, bf16* y, int64_t h, float eps) {
  float sum = 0.f;
  for (int64_t i = 0; i < h; i++) {
    float v = static_cast<float>(x[i]);
    sum += v * v;
  }
  float r = 1.f / std::sqrt(sum / static_cast<float>(h) + eps);
  for (int64_t i = 0; i < h; i++) {
    bf16 n = bf16(static_cast<float>(x[i]) * r);
    y[i] = bf16(static_cast<float>(w[i]) * static_cast<float>(n));
  }
}
}  // namespace

// x [..., h], w [h] -> RMSNorm(x) * w, bf16 [..., h]
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check(x, "x");
  check(w, "w");
  int64_t h = w.numel();
  TORCH_CHECK(x.size(-1) == h, "x's last dimension ", x.size(-1), " is not the weight's ", h);
  auto y = torch::empty_like(x);
  int64_t rows = x.numel() / h;
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = w.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  for (int64_t r = 0; r < rows; r++) rms_row(xp + r * h, wp, yp + r * h, h, (float)eps);
  return y;
}

// x, delta [..., h], w [h] -> (s = x + delta, RMSNorm(s) * w): the residual add and the next
// norm in one call (s rounded to bf16 first, as torch's bf16 add does)
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor w, double eps) {
  check(x, "x");
  check(delta, "delta");
  check(w, "w");
  int64_t h = w.numel();
  TORCH_CHECK(x.sizes() == delta.sizes(), "x ", x.sizes(), " and delta ", delta.sizes(), " differ");
  TORCH_CHECK(x.size(-1) == h, "x's last dimension ", x.size(-1), " is not the weight's ", h);
  auto s = torch::empty_like(x);
  auto y = torch::empty_like(x);
  int64_t n = x.numel();
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* dp = delta.data_ptr<bf16>();
  bf16* sp = s.data_ptr<bf16>();
  for (int64_t i = 0; i < n; i++) sp[i] = bf16(static_cast<float>(xp[i]) + static_cast<float>(dp[i]));
  const bf16* wp = w.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  for (int64_t r = 0; r < n / h; r++) rms_row(sp + r * h, wp, yp + r * h, h, (float)eps);
  return {s, y};
}

// In place, the rotary embedding of the first `heads` heads (of head_dim hd) of each row of t
// [rows, width]: t = bf16(bf16(t * cos) + bf16(rot(t) * sin)), rot(t) = cat(-t[half:], t[:half])
// per head; cos, sin [rows, hd] (each row its position's). q and k sit side by side at the
// start of a fused qkv projection, so one call rotates both.
void rope_(torch::Tensor t, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t hd) {
  check(t, "t");
  check(cos, "cos");
  check(sin, "sin");
  TORCH_CHECK(t.dim() == 2 && cos.dim() == 2 && sin.dim() == 2, "t, cos and sin must be 2-d");
  int64_t rows = t.size(0), width = t.size(1), half = hd / 2;
  TORCH_CHECK(hd % 2 == 0 && heads * hd <= width, heads, " heads of ", hd, " do not fit a row of ", width);
  TORCH_CHECK(cos.size(0) == rows && sin.size(0) == rows && cos.size(1) == hd && sin.size(1) == hd,
              "cos and sin must be [", rows, ", ", hd, "]");
  bf16* tp = t.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* snp = sin.data_ptr<bf16>();
  std::vector<float> a(hd);
  for (int64_t r = 0; r < rows; r++) {
    const bf16* c = cp + r * hd;
    const bf16* s = snp + r * hd;
    for (int64_t hh = 0; hh < heads; hh++) {
      bf16* x = tp + r * width + hh * hd;
      for (int64_t i = 0; i < hd; i++) a[i] = static_cast<float>(x[i]);
      for (int64_t i = 0; i < hd; i++) {
        float rot = i < half ? -a[i + half] : a[i - half];
        float xc = static_cast<float>(bf16(a[i] * static_cast<float>(c[i])));
        float rs = static_cast<float>(bf16(rot * static_cast<float>(s[i])));
        x[i] = bf16(xc + rs);
      }
    }
  }
}

// gu [..., 2 * inter] (gate | up) -> bf16(bf16(silu(gate)) * up), [..., inter]
torch::Tensor silu_mul(torch::Tensor gu) {
  check(gu, "gu");
  int64_t width = gu.size(-1);
  TORCH_CHECK(width % 2 == 0, "gate and up need an even last dimension, got ", width);
  int64_t inter = width / 2, rows = gu.numel() / width;
  auto sizes = gu.sizes().vec();
  sizes.back() = inter;
  auto y = torch::empty(sizes, gu.options());
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(gu.data_ptr<bf16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<bf16>());
  // the thread's own buffers, grown once (not allocated and zeroed per call)
  thread_local std::vector<float> g, u, act;
  thread_local std::vector<uint16_t> act16;
  g.resize(inter);
  u.resize(inter);
  act.resize(inter);
  act16.resize(inter);
  for (int64_t r = 0; r < rows; r++) {
    bf16_to_float(gp + r * width, g.data(), inter);
    bf16_to_float(gp + r * width + inter, u.data(), inter);
    for (int64_t i = 0; i < inter; i++) act[i] = g[i] / (1.f + exp_vec(-g[i]));
    float_to_bf16(act.data(), act16.data(), inter);  // silu's output is bf16, as torch's
    bf16_to_float(act16.data(), act.data(), inter);
    for (int64_t i = 0; i < inter; i++) act[i] *= u[i];
    float_to_bf16(act.data(), yp + r * inter, inter);
  }
  return y;
}


namespace {
// One query row's attention for the g query heads that share a kv head: q [g, hd] float
// (hd a multiple of 16), keys k and values v [len, hd] bf16 -> out [g, hd] bf16. For each
// head, every sum runs in one fixed order (q . k over hd, then the weights in key order),
// the same whichever rows or heads share the call.
//   With AVX-512: 16 float lanes a step, bf16 widened by a shift; the g heads go 8 at a time
// through each key (and each 16 values of it), so their FMAs are independent and a key is
// read once for all of them (one head at a time was latency-bound: ~60 cycles a key).
constexpr int kHeadsAtOnce = 8;

#if defined(__AVX512F__)
inline __m512 load_bf16x16(const bf16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// G heads' scores for keys 0 .. len - 1 (q [G, hd], rows of scores `len` apart), and their
// weighted sums of values into acc [G, hd]. G is a template argument so that the G
// accumulators live in registers (with G a runtime count GCC kept them on the stack and each
// FMA waited on a store: ~6x slower).
template <int G>
void scores_block(const float* q, const bf16* k, int64_t len, int64_t hd, float scale, float* scores) {
  for (int64_t t = 0; t < len; t++) {
#if defined(__AVX512F__)
    __m512 d[G];
    for (int h = 0; h < G; h++) d[h] = _mm512_setzero_ps();
    for (int64_t c = 0; c < hd; c += 16) {
      __m512 kk = load_bf16x16(k + t * hd + c);
      for (int h = 0; h < G; h++) d[h] = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * hd + c), kk, d[h]);
    }
    for (int h = 0; h < G; h++) scores[h * len + t] = _mm512_reduce_add_ps(d[h]) * scale;
#else
    for (int h = 0; h < G; h++) {
      float lane[16] = {0.f};
      for (int64_t c = 0; c < hd; c += 16)
        for (int l = 0; l < 16; l++) lane[l] += q[h * hd + c + l] * static_cast<float>(k[t * hd + c + l]);
      for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; l++) lane[l] += lane[l + w];
      scores[h * len + t] = lane[0] * scale;
    }
#endif
  }
}

template <int G>
void values_block(const float* scores, const bf16* v, int64_t len, int64_t hd, float* acc) {
  for (int64_t c = 0; c < hd; c += 16) {
#if defined(__AVX512F__)
    __m512 a[G];
    for (int h = 0; h < G; h++) a[h] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t++) {
      __m512 vv = load_bf16x16(v + t * hd + c);
      for (int h = 0; h < G; h++) a[h] = _mm512_fmadd_ps(_mm512_set1_ps(scores[h * len + t]), vv, a[h]);
    }
    for (int h = 0; h < G; h++) _mm512_storeu_ps(acc + h * hd + c, a[h]);
#else
    for (int h = 0; h < G; h++) {
      float* a = acc + h * hd + c;
      for (int l = 0; l < 16; l++) a[l] = 0.f;
      for (int64_t t = 0; t < len; t++) {
        const float w = scores[h * len + t];
        for (int l = 0; l < 16; l++) a[l] += w * static_cast<float>(v[t * hd + c + l]);
      }
    }
#endif
  }
}

template <int G>
void heads_block(const float* q, const bf16* k, const bf16* v, int64_t len, int64_t hd, float scale, float* scores,
                 float* acc) {
  scores_block<G>(q, k, len, hd, scale, scores);
  for (int h = 0; h < G; h++) {  // softmax weights, unnormalised (the sum divides at the end)
    float* sc = scores + h * len;
    float m = -INFINITY;
    for (int64_t t = 0; t < len; t++) m = sc[t] > m ? sc[t] : m;
    for (int64_t t = 0; t < len; t++) sc[t] = exp_vec(sc[t] - m);
  }
  values_block<G>(scores, v, len, hd, acc);
}

void attend_heads(const float* q, int64_t g, const bf16* k, const bf16* v, int64_t len, int64_t hd, float scale,
                  float* scores /* [g, len] */, float* acc /* [g, hd] */, bf16* out, int64_t out_stride) {
  using Block = void (*)(const float*, const bf16*, const bf16*, int64_t, int64_t, float, float*, float*);
  static constexpr Block blocks[kHeadsAtOnce] = {heads_block<1>, heads_block<2>, heads_block<3>, heads_block<4>,
                                                 heads_block<5>, heads_block<6>, heads_block<7>, heads_block<8>};
  for (int64_t h0 = 0; h0 < g; h0 += kHeadsAtOnce) {
    const int64_t gh = std::min<int64_t>(kHeadsAtOnce, g - h0);
    blocks[gh - 1](q + h0 * hd, k, v, len, hd, scale, scores + h0 * len, acc + h0 * hd);
  }
  for (int64_t h = 0; h < g; h++) {
    const float* sc = scores + h * len;
    float sum = 0.f;
    for (int64_t t = 0; t < len; t++) sum += sc[t];
    const float inv = 1.f / sum;
    float* a = acc + h * hd;
    for (int64_t d = 0; d < hd; d++) a[d] *= inv;
    float_to_bf16(a, reinterpret_cast<uint16_t*>(out + h * out_stride), hd);
  }
}
}  // namespace

// Causal attention of a few query rows per sequence against its own KV cache, with the new
// rows' keys and values written into that cache first: the runner's decode and
// verification blocks (actors/layer_ops.py FusedLayerOps.attend says which rows).
// qkv [T, width] bf16 holds each row's q | k | v (q and k already rotated); sequence i's rows
// are qkv rows offsets[i] + j, j < counts[i], at positions starts[i] + j; keys[i], values[i]
// [kv_heads, capacity, hd] are its cache for this layer. Query row j of a sequence sees keys
// 0 .. starts[i] + j; query head h reads kv head h / (heads / kv_heads). Float throughout:
// scores (q . k) / sqrt(hd), softmax with its max taken out, the weighted sum of values
// divided by the weights' sum, rounded to bf16 once, into out [T, heads * hd] (rows not listed
// are left as they are). Each output row takes the same operations in the same order whatever
// the other rows of the call (a block's row is bit for bit that row computed alone). One
// thread runs it, the GIL released.
void attend(torch::Tensor qkv, int64_t heads, int64_t kv_heads, int64_t hd, std::vector<torch::Tensor> keys,
            std::vector<torch::Tensor> values, std::vector<int64_t> offsets, std::vector<int64_t> starts,
            std::vector<int64_t> counts, torch::Tensor out) {
  check(qkv, "qkv");
  check(out, "out");
  TORCH_CHECK(qkv.dim() == 2 && out.dim() == 2, "qkv and out must be 2-d");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0, heads, " heads do not share ", kv_heads, " kv heads");
  TORCH_CHECK(hd > 0 && hd % 16 == 0, "head_dim must be a multiple of 16, got ", hd);
  int64_t T = qkv.size(0), width = qkv.size(1), group = heads / kv_heads;
  TORCH_CHECK(width >= (heads + 2 * kv_heads) * hd, "qkv rows of ", width, " do not hold q, k and v");
  TORCH_CHECK(out.size(0) == T && out.size(1) == heads * hd, "out must be [", T, ", ", heads * hd, "]");
  size_t B = keys.size();
  TORCH_CHECK(values.size() == B && offsets.size() == B && starts.size() == B && counts.size() == B,
              "keys, values, offsets, starts and counts must have one entry per sequence");
  const bf16* qp = qkv.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  thread_local std::vector<float> q, scores, acc;
  q.resize(group * hd);
  acc.resize(group * hd);
  for (size_t i = 0; i < B; i++) {
    check(keys[i], "keys");
    check(values[i], "values");
    int64_t s = starts[i], n = counts[i], o = offsets[i];
    TORCH_CHECK(keys[i].dim() == 3 && keys[i].sizes() == values[i].sizes() && keys[i].size(0) == kv_heads &&
                    keys[i].size(2) == hd,
                "a cache must be [", kv_heads, ", capacity, ", hd, "] for keys and values alike");
    int64_t cap = keys[i].size(1);
    TORCH_CHECK(s >= 0 && n >= 0 && o >= 0 && o + n <= T && s + n <= cap, "sequence ", i, ": rows ", o, "+", n,
                " at position ", s, " do not fit qkv's ", T, " rows or the cache's ", cap, " positions");
    bf16* kc = keys[i].data_ptr<bf16>();
    bf16* vc = values[i].data_ptr<bf16>();
    for (int64_t j = 0; j < n; j++)
      for (int64_t kh = 0; kh < kv_heads; kh++) {
        const bf16* row = qp + (o + j) * width + (heads + kh) * hd;
        std::memcpy(kc + (kh * cap + s + j) * hd, row, hd * sizeof(bf16));
        std::memcpy(vc + (kh * cap + s + j) * hd, row + kv_heads * hd, hd * sizeof(bf16));
      }
    scores.resize(group * (s + n));
    for (int64_t j = 0; j < n; j++)
      for (int64_t kh = 0; kh < kv_heads; kh++) {
        const bf16* qrow = qp + (o + j) * width + kh * group * hd;  // the group's heads side by side
        bf16_to_float(reinterpret_cast<const uint16_t*>(qrow), q.data(), group * hd);
        attend_heads(q.data(), group, kc + kh * cap * hd, vc + kh * cap * hd, s + j + 1, hd, scale, scores.data(),
                     acc.data(), op + (o + j) * heads * hd + kh * group * hd, hd);
      }
  }
}

void register_layer_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rope_", &rope_);
  m.def("silu_mul", &silu_mul);
  m.def("attend", &attend, pybind11::call_guard<pybind11::gil_scoped_release>());
}
