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

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

void register_layer_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rope_", &rope_);
  m.def("silu_mul", &silu_mul);
}
