// Drives the mask-tuning launchers (kernels/mask.h) directly (no torch), against host references:
//   mask_apply         scores (float32 or the weight's dtype) -> w_eff and packed bits; scores -> bits
//                      alone (no weight); bits_in -> w_eff and bits
//   mask_ste_backward  d_scores = G * weight and d_weight = G * mask; d_scores alone
//   masked_matvec      mask from scores, from bits, and from per-token bits (task_ids, -1 or out of
//                      range = no mask)
// in float32, bfloat16 (and float16), with column counts that are not multiples of 32 (33, 1000,
// 2100: x is staged in 1024-column chunks) and odd row counts. Masks, bits and selected copies
// (w_eff, d_weight) must match exactly; computed values within 1e-5 (float32) or 1e-2 (16-bit).
// Exit 0 pass, 1 fail, 77 no GPU (CTest: skipped).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/mask.h"
#include "launcher_test.h"

using launcher_test::close;
using launcher_test::Device;
using launcher_test::dtype_name;
using launcher_test::dtype_of;
using launcher_test::equal;
using launcher_test::round_all;
using launcher_test::round_to;
namespace k = peftkern::kernels;

namespace {

// Exactly representable in float32, bfloat16 and float16, so planted scores can equal it exactly.
constexpr float kThreshold = 0.25f;

template <typename T> double tolerance() { return std::is_same_v<T, float> ? 1e-5 : 1e-2; }

std::vector<double> normal(size_t count, std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  std::vector<double> v(count);
  for (auto& e : v) e = n(rng);
  return v;
}

// Scores as stored in TS. Random ones stay at least 1e-3 from the threshold, so the kept/dropped
// decision does not hang on rounding; then a few are planted exactly at the threshold (dropped: the
// comparison is strict) and one NaN (dropped), the edge cases mask.h documents.
template <typename TS> std::vector<double> make_scores(int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  std::vector<double> s(size_t(rows) * cols);
  for (auto& e : s) {
    do e = round_to<TS>(n(rng));
    while (std::fabs(e - kThreshold) < 1e-3);
  }
  for (size_t i = 3; i < s.size(); i += 17) s[i] = kThreshold;
  s[s.size() / 2] = std::numeric_limits<double>::quiet_NaN();
  return s;
}

// kept <=> float(score) > float(threshold): NaN compares false.
std::vector<uint8_t> keep_of(const std::vector<double>& scores) {
  std::vector<uint8_t> keep(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) keep[i] = static_cast<float>(scores[i]) > kThreshold;
  return keep;
}

// mask.h's layout: int32 words [rows, ceil(cols / 32)]; bit j of word w of row n = element (n, 32 w + j);
// bits past cols 0.
std::vector<int32_t> pack_bits(const std::vector<uint8_t>& keep, int64_t rows, int64_t cols) {
  const int64_t words = peftkern::mask_words(cols);
  std::vector<int32_t> bits(size_t(rows * words), 0);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t c = 0; c < cols; ++c)
      if (keep[size_t(n * cols + c)]) {
        const uint32_t word = static_cast<uint32_t>(bits[size_t(n * words + c / 32)]) | (1u << (c % 32));
        bits[size_t(n * words + c / 32)] = static_cast<int32_t>(word);
      }
  return bits;
}

std::vector<double> apply_mask(const std::vector<double>& v, const std::vector<uint8_t>& keep) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = keep[i] ? v[i] : 0.0;
  return out;
}

template <typename TW, typename TS> std::string label(const char* op, int64_t rows, int64_t cols) {
  char buf[128];
  std::snprintf(buf, sizeof buf, "%s w=%s s=%s rows=%lld cols=%lld", op, dtype_name<TW>(), dtype_name<TS>(),
                static_cast<long long>(rows), static_cast<long long>(cols));
  return buf;
}

// mask_apply and mask_ste_backward over one [rows, cols] weight.
template <typename TW, typename TS> bool elementwise_case(int64_t rows, int64_t cols, std::mt19937& rng) {
  const size_t n = size_t(rows) * cols, words = size_t(rows * peftkern::mask_words(cols));
  std::vector<double> w = normal(n, rng), g = normal(n, rng);
  round_all<TW>(w);
  round_all<TW>(g);
  const std::vector<double> s = make_scores<TS>(rows, cols, rng);
  const std::vector<uint8_t> keep = keep_of(s);
  const std::vector<int32_t> bits = pack_bits(keep, rows, cols);
  const std::vector<double> w_eff = apply_mask(w, keep), d_weight = apply_mask(g, keep);
  std::vector<double> d_scores(n);
  for (size_t i = 0; i < n; ++i) d_scores[i] = g[i] * w[i];

  Device<TW> w_dev(w), g_dev(g);
  Device<TS> s_dev(s);
  Device<int32_t> bits_dev = Device<int32_t>::raw(bits);
  bool ok = true;

  k::MaskApplyArgs a{};
  a.w_dtype = dtype_of<TW>();
  a.s_dtype = dtype_of<TS>();
  a.rows = rows;
  a.cols = cols;
  a.threshold = kThreshold;
  {  // scores -> w_eff and bits in one pass
    Device<TW> out_w(n);
    Device<int32_t> out_bits(words);
    a.weight = w_dev.ptr;
    a.scores = s_dev.ptr;
    a.w_eff = out_w.ptr;
    a.bits_out = out_bits.ptr;
    CHECK_CUDA(k::mask_apply(a, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    ok &= equal(label<TW, TS>("mask_apply scores: w_eff", rows, cols), out_w.host(), w_eff);
    ok &= equal(label<TW, TS>("mask_apply scores: bits", rows, cols), out_bits.raw_host(), bits);
  }
  {  // scores -> bits alone: the weight is not needed
    Device<int32_t> out_bits(words);
    a.weight = nullptr;
    a.scores = s_dev.ptr;
    a.w_eff = nullptr;
    a.bits_out = out_bits.ptr;
    CHECK_CUDA(k::mask_apply(a, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    ok &= equal(label<TW, TS>("mask_apply scores, no weight: bits", rows, cols), out_bits.raw_host(), bits);
  }
  {  // bits_in (scores null) -> w_eff and bits
    Device<TW> out_w(n);
    Device<int32_t> out_bits(words);
    a.weight = w_dev.ptr;
    a.scores = nullptr;
    a.bits_in = bits_dev.ptr;
    a.w_eff = out_w.ptr;
    a.bits_out = out_bits.ptr;
    CHECK_CUDA(k::mask_apply(a, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    ok &= equal(label<TW, TS>("mask_apply bits_in: w_eff", rows, cols), out_w.host(), w_eff);
    ok &= equal(label<TW, TS>("mask_apply bits_in: bits", rows, cols), out_bits.raw_host(), bits);
  }

  k::MaskSteArgs b{};
  b.w_dtype = dtype_of<TW>();
  b.s_dtype = dtype_of<TS>();
  b.rows = rows;
  b.cols = cols;
  b.grad_w_eff = g_dev.ptr;
  b.weight = w_dev.ptr;
  {  // both gradients in one pass
    Device<TS> out_ds(n);
    Device<TW> out_dw(n);
    b.bits = bits_dev.ptr;
    b.d_scores = out_ds.ptr;
    b.d_weight = out_dw.ptr;
    CHECK_CUDA(k::mask_ste_backward(b, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    ok &= close(label<TW, TS>("mask_ste d_scores", rows, cols), out_ds.host(), d_scores, tolerance<TS>());
    ok &= equal(label<TW, TS>("mask_ste d_weight", rows, cols), out_dw.host(), d_weight);
  }
  {  // d_scores alone: the bits are not needed
    Device<TS> out_ds(n);
    b.bits = nullptr;
    b.d_scores = out_ds.ptr;
    b.d_weight = nullptr;
    CHECK_CUDA(k::mask_ste_backward(b, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    ok &= close(label<TW, TS>("mask_ste d_scores alone", rows, cols), out_ds.host(), d_scores, tolerance<TS>());
  }
  return ok;
}

// out[t, n] = sum_k x[t, k] w[n, k] mask[n, k] (+ bias[n]), with mask[n, k] = keep[task][n * n_in + k]
// (task_of[t] = -1: no mask).
std::vector<double> matvec_reference(const std::vector<double>& x, const std::vector<double>& w,
                                     const std::vector<double>* bias, const std::vector<std::vector<uint8_t>>& keep,
                                     const std::vector<int>& task_of, int64_t n_in, int64_t n_out) {
  const int64_t tokens = static_cast<int64_t>(task_of.size());
  std::vector<double> out(size_t(tokens * n_out));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t n = 0; n < n_out; ++n) {
      double acc = bias ? (*bias)[size_t(n)] : 0.0;
      for (int64_t c = 0; c < n_in; ++c) {
        const size_t e = size_t(n * n_in + c);
        if (task_of[size_t(t)] < 0 || keep[size_t(task_of[size_t(t)])][e]) acc += x[size_t(t * n_in + c)] * w[e];
      }
      out[size_t(t * n_out + n)] = acc;
    }
  return out;
}

template <typename T, typename TS>
bool matvec_case(int64_t tokens, int64_t n_in, int64_t n_out, bool with_bias, std::mt19937& rng) {
  constexpr int kTasks = 3;
  std::vector<double> x = normal(size_t(tokens * n_in), rng), w = normal(size_t(n_out * n_in), rng);
  std::vector<double> bias = normal(size_t(n_out), rng);
  round_all<T>(x);
  round_all<T>(w);
  round_all<T>(bias);
  // One mask per task; task 0's scores also drive the scores and shared-bits paths.
  std::vector<std::vector<double>> scores(kTasks);
  std::vector<std::vector<uint8_t>> keep(kTasks);
  std::vector<int32_t> all_bits;
  for (int i = 0; i < kTasks; ++i) {
    scores[size_t(i)] = make_scores<TS>(n_out, n_in, rng);
    keep[size_t(i)] = keep_of(scores[size_t(i)]);
    const std::vector<int32_t> b = pack_bits(keep[size_t(i)], n_out, n_in);
    all_bits.insert(all_bits.end(), b.begin(), b.end());
  }
  // Token t's task for the per-token case: -1, 0, 1, 2, -1, ... shuffled (-1 is always present).
  std::vector<int64_t> task_ids(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) task_ids[size_t(t)] = t % (kTasks + 1) - 1;
  std::shuffle(task_ids.begin(), task_ids.end(), rng);

  const std::vector<double>* b = with_bias ? &bias : nullptr;
  const std::vector<int> all_task0(size_t(tokens), 0);
  std::vector<int> per_token(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) per_token[size_t(t)] = static_cast<int>(task_ids[size_t(t)]);
  const std::vector<double> ref_shared = matvec_reference(x, w, b, keep, all_task0, n_in, n_out);
  const std::vector<double> ref_tasks = matvec_reference(x, w, b, keep, per_token, n_in, n_out);

  Device<T> x_dev(x), w_dev(w), bias_dev(bias);
  Device<TS> s_dev(scores[0]);
  Device<int32_t> bits_dev = Device<int32_t>::raw(all_bits);  // task 0's bits come first: [n_out, words]
  Device<int64_t> tasks_dev = Device<int64_t>::raw(task_ids);
  // The same tokens with their -1 ids replaced in turn by ids outside [0, tasks) (kTasks, 2^40, -7):
  // the kernel must treat them as no mask, not read past the stack (what CUDA graph capture relies on).
  const int64_t wild[] = {kTasks, int64_t(1) << 40, -7};
  std::vector<int64_t> wild_ids = task_ids;
  int replaced = 0;
  for (int64_t& id : wild_ids)
    if (id < 0) id = wild[replaced++ % 3];
  Device<int64_t> wild_dev = Device<int64_t>::raw(wild_ids);
  char buf[160];
  std::snprintf(buf, sizeof buf, "masked_matvec %s s=%s tokens=%lld n_in=%lld n_out=%lld%s", dtype_name<T>(),
                dtype_name<TS>(), static_cast<long long>(tokens), static_cast<long long>(n_in),
                static_cast<long long>(n_out), with_bias ? " bias" : "");
  const std::string l(buf);

  k::MaskedMatvecArgs a{};
  a.dtype = dtype_of<T>();
  a.s_dtype = dtype_of<TS>();
  a.tokens = tokens;
  a.n_in = n_in;
  a.n_out = n_out;
  a.threshold = kThreshold;
  a.x = x_dev.ptr;
  a.weight = w_dev.ptr;
  a.bias = with_bias ? bias_dev.ptr : nullptr;
  a.tasks = kTasks;
  bool ok = true;
  auto run = [&](const void* scores_ptr, const int32_t* bits_ptr, const int64_t* ids, const std::string& what,
                 const std::vector<double>& ref) {
    Device<T> out(size_t(tokens * n_out));
    a.scores = scores_ptr;
    a.bits = bits_ptr;
    a.task_ids = ids;
    a.out = out.ptr;
    CHECK_CUDA(k::masked_matvec(a, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    ok &= close(l + what, out.host(), ref, tolerance<T>());
  };
  run(s_dev.ptr, nullptr, nullptr, " (scores)", ref_shared);
  run(nullptr, bits_dev.ptr, nullptr, " (bits)", ref_shared);
  run(nullptr, bits_dev.ptr, tasks_dev.ptr, " (bits, task_ids)", ref_tasks);
  run(nullptr, bits_dev.ptr, wild_dev.ptr, " (bits, out-of-range task_ids)", ref_tasks);
  return ok;
}

}  // namespace

int main() {
  if (!launcher_test::gpu_available()) return launcher_test::kSkipped;
  using bf16 = __nv_bfloat16;
  using f16 = __half;
  std::mt19937 rng(2024);
  bool ok = true;
  // Element-wise kernels: a warp covers 8 words (256 columns) per step; 33 and 1000 leave partial
  // words, 256 is exactly one step, and 66000 rows need more warps than the grid (grid-stride loop).
  ok &= elementwise_case<float, float>(7, 33, rng);
  ok &= elementwise_case<float, float>(5, 1000, rng);
  ok &= elementwise_case<float, float>(4, 256, rng);
  ok &= elementwise_case<float, float>(66000, 40, rng);
  ok &= elementwise_case<bf16, float>(7, 33, rng);
  ok &= elementwise_case<bf16, float>(9, 1000, rng);
  ok &= elementwise_case<bf16, bf16>(7, 1000, rng);
  ok &= elementwise_case<bf16, bf16>(3, 33, rng);
  ok &= elementwise_case<f16, f16>(7, 33, rng);
  ok &= elementwise_case<f16, float>(5, 1000, rng);
  // masked_matvec: 16 rows per block (7, 19, 37 leave partial blocks); n_in 33 and 2100 take the
  // unvectorised weight loads in 16-bit (and 33 in float32), 2100 spans three x chunks; 16 float32
  // tokens need 64 KB of shared memory (above the default 48 KB).
  ok &= matvec_case<float, float>(1, 33, 7, true, rng);
  ok &= matvec_case<float, float>(5, 1000, 37, false, rng);
  ok &= matvec_case<float, float>(16, 2100, 19, true, rng);
  ok &= matvec_case<bf16, float>(3, 1000, 7, true, rng);
  ok &= matvec_case<bf16, bf16>(16, 33, 37, false, rng);
  ok &= matvec_case<bf16, bf16>(7, 2100, 20, true, rng);
  ok &= matvec_case<f16, f16>(4, 1000, 9, true, rng);
  std::printf(ok ? "PASSED\n" : "FAILED\n");
  return ok ? 0 : 1;
}
