// Drives the prefix-attention launchers (kernels/prefix_attention.h) directly (no torch), against
// float64 references on the host computed from the fp16/bf16-rounded inputs.
//   forward   the sequence part (out_s, lse_s) is made here by a float64 softmax over each row's
//             visible sequence keys (some rows see none: lse_s = +-inf and out_s NaN, which must not
//             be read) and passed in; the merged out and lse must equal softmax over [prefix; seq].
//   backward  given the merged out and lse: dq (written, and added to dq), probs and dscores, whose
//             columns P..probs_ld must be zero.
// Covers fp16 and bf16, head dims 64, 72 (not a multiple of 16), 128 and 256, GQA, T = 2 tasks with
// out-of-range prefix ids (no prefix), S = 0 (no sequence part), the in-place merge, and strided
// [B, L, H, D] / padded-row layouts. Exit 0 pass, 1 fail, 77 no GPU or below sm_80 (CTest: skipped).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/prefix_attention.h"
#include "launcher_test.h"

using launcher_test::close;
using launcher_test::Device;
using launcher_test::dtype_name;
using launcher_test::dtype_of;
using launcher_test::equal;
using launcher_test::round_all;
namespace k = peftkern::kernels;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kTol = 1e-2;     // fp16 / bf16 outputs
constexpr double kLseTol = 1e-3;  // lse: float32 statistics of exactly-rounded inputs

struct Case {
  int B, H, Hkv, L, P, S, D;
  int T;          // prefix tasks; 1 with prefix_ids null
  bool ids;       // pass prefix_ids (cycling 1, 0, T, -1: two of them out of range)
  bool in_place;  // forward: out aliases seq_out (needs S > 0)
  int probs_pad;  // probs_ld = P rounded up to even + probs_pad
};

// Where element (b, h, i, d) of a [B, heads, rows, D] tensor lives: b * sb + h * sh + i * sr + d.
struct Layout {
  int64_t sb, sh, sr, size;
  int64_t at(int b, int h, int64_t i) const { return b * sb + h * sh + i * sr; }
};
Layout bhld(int B, int H, int L, int D) { return {int64_t(H) * L * D, int64_t(L) * D, D, int64_t(B) * H * L * D}; }
// PyTorch's [B, L, H, D] tensor viewed as [B, H, L, D] (transpose(1, 2)), as attention gets q.
Layout blhd(int B, int H, int L, int D) { return {int64_t(L) * H * D, D, int64_t(H) * D, int64_t(B) * L * H * D}; }
// Rows padded to D + 8 elements (strides stay even).
Layout padded(int B, int H, int L, int D) {
  const int64_t ld = D + 8;
  return {int64_t(H) * L * ld, L * ld, ld, int64_t(B) * H * L * ld};
}

// Logical [B, H, L, D] values (row-major) into a buffer of the layout, NaN in the gaps; and back.
std::vector<double> scatter(const std::vector<double>& v, const Layout& l, int B, int H, int L, int D) {
  std::vector<double> buf(size_t(l.size), kNaN);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < L; ++i)
        for (int d = 0; d < D; ++d) buf[size_t(l.at(b, h, i) + d)] = v[((size_t(b) * H + h) * L + i) * D + d];
  return buf;
}
std::vector<double> gather(const std::vector<double>& buf, const Layout& l, int B, int H, int L, int D) {
  std::vector<double> v(size_t(B) * H * L * D);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < L; ++i)
        for (int d = 0; d < D; ++d) v[((size_t(b) * H + h) * L + i) * D + d] = buf[size_t(l.at(b, h, i) + d)];
  return v;
}

template <typename T> k::AttnRows rows_of(const Device<T>& dev, const Layout& l) { return {dev.ptr, l.sb, l.sh, l.sr}; }

std::vector<double> normal(size_t count, std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  std::vector<double> v(count);
  for (auto& e : v) e = n(rng);
  return v;
}

double dot(const double* a, const double* b, int D) {
  double s = 0;
  for (int d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// Softmax attention of query q over the given keys: natural-log lse and out = sum p v. No key: lse
// = +inf and out = 0 (prefix_attention.h's convention, FlashAttention's).
void attend(const double* q, const std::vector<const double*>& keys, const std::vector<const double*>& vals, int D,
            double scale, double* out, double* lse) {
  for (int d = 0; d < D; ++d) out[d] = 0;
  if (keys.empty()) {
    *lse = kInf;
    return;
  }
  std::vector<double> s(keys.size());
  double mx = -kInf;
  for (size_t j = 0; j < keys.size(); ++j) mx = std::fmax(mx, s[j] = scale * dot(q, keys[j], D));
  double sum = 0;
  for (size_t j = 0; j < keys.size(); ++j) sum += s[j] = std::exp(s[j] - mx);
  for (size_t j = 0; j < keys.size(); ++j)
    for (int d = 0; d < D; ++d) out[d] += s[j] / sum * vals[j][d];
  *lse = mx + std::log(sum);
}

template <typename T> bool run_case(const Case& c, std::mt19937& rng) {
  const int B = c.B, H = c.H, Hkv = c.Hkv, L = c.L, P = c.P, S = c.S, D = c.D, T_ = c.T, G = H / Hkv;
  const float scale_f = static_cast<float>(1 / std::sqrt(double(D)));
  const double scale = scale_f;  // the value the kernels get
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s B=%d H=%d Hkv=%d L=%d P=%d S=%d D=%d T=%d%s%s", dtype_name<T>(), B, H, Hkv, L, P,
                S, D, T_, c.ids ? " ids" : "", c.in_place ? " in-place" : "");
  const std::string label(buf);
  const size_t rows = size_t(B) * H * L;
  auto row_of = [&](int b, int h, int i) { return (size_t(b) * H + h) * L + i; };

  // Inputs, rounded to T: the references see what the kernels see.
  std::vector<double> q = normal(rows * D, rng), pk = normal(size_t(T_) * Hkv * P * D, rng);
  std::vector<double> pv = normal(pk.size(), rng), ks = normal(size_t(B) * Hkv * S * D, rng);
  std::vector<double> vs = normal(ks.size(), rng), grad_out = normal(rows * D, rng);
  for (auto* v : {&q, &pk, &pv, &ks, &vs, &grad_out}) round_all<T>(*v);
  std::vector<int64_t> ids(static_cast<size_t>(B));
  const int64_t cycle[4] = {1, 0, T_, -1};
  for (int b = 0; b < B; ++b) ids[size_t(b)] = c.ids ? cycle[b % 4] : 0;  // with T = 1, id 1 is out of range too
  auto task_ok = [&](int b) { return ids[size_t(b)] >= 0 && ids[size_t(b)] < T_; };
  auto pk_row = [&](int b, int hk, int j) { return &pk[((size_t(ids[size_t(b)]) * Hkv + hk) * P + j) * D]; };
  auto pv_row = [&](int b, int hk, int j) { return &pv[((size_t(ids[size_t(b)]) * Hkv + hk) * P + j) * D]; };

  // Sequence part: row (b, h, i) sees the first n_vis of its S keys (none for every fifth row).
  // Every seventh row that sees some is poisoned: lse_s +inf (a +inf score) or NaN, out_s NaN; its
  // merged out and lse must be NaN, as eager softmax gives.
  std::vector<int> n_vis(rows, 0);
  std::vector<uint8_t> poisoned(rows, 0);
  std::vector<double> out_s(rows * D, 0), lse_s(rows, kInf), out(rows * D), lse(rows);
  std::uniform_int_distribution<int> vis(1, S > 0 ? S : 1);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < L; ++i) {
        const size_t r = row_of(b, h, i);
        const int hk = h / G;  // GQA: query head h reads kv head h / (H / Hkv)
        n_vis[r] = (S == 0 || r % 5 == 2) ? 0 : vis(rng);
        std::vector<const double*> kk, vv;
        for (int j = 0; j < n_vis[r]; ++j) {
          kk.push_back(&ks[((size_t(b) * Hkv + hk) * S + j) * D]);
          vv.push_back(&vs[((size_t(b) * Hkv + hk) * S + j) * D]);
        }
        attend(&q[r * D], kk, vv, D, scale, &out_s[r * D], &lse_s[r]);
        if (n_vis[r] == 0) {  // the glue marks the row -inf; its out_s must not be read
          lse_s[r] = -kInf;
          for (int d = 0; d < D; ++d) out_s[r * D + d] = kNaN;
        } else if (r % 7 == 3) {
          poisoned[r] = 1;
          lse_s[r] = r % 2 ? kInf : kNaN;
          for (int d = 0; d < D; ++d) out_s[r * D + d] = kNaN;
        }
        // The merged reference: one softmax over [prefix; visible sequence keys].
        if (task_ok(b))
          for (int j = P - 1; j >= 0; --j) {
            kk.insert(kk.begin(), pk_row(b, hk, j));
            vv.insert(vv.begin(), pv_row(b, hk, j));
          }
        attend(&q[r * D], kk, vv, D, scale, &out[r * D], &lse[r]);
      }

  const Layout lq = blhd(B, H, L, D), ls = padded(B, H, L, D), lo = bhld(B, H, L, D);
  Device<T> q_dev(scatter(q, lq, B, H, L, D)), pk_dev(pk), pv_dev(pv);
  Device<int64_t> ids_dev = Device<int64_t>::raw(ids);
  k::PrefixAttentionShape shape{};
  shape.dtype = dtype_of<T>();
  shape.B = B;
  shape.H = H;
  shape.Hkv = Hkv;
  shape.L = L;
  shape.P = P;
  shape.D = D;
  shape.scale = scale_f;
  shape.prefix_k = pk_dev.ptr;
  shape.prefix_v = pv_dev.ptr;
  shape.prefix_ids = c.ids ? ids_dev.ptr : nullptr;
  shape.num_tasks = T_;
  bool ok = true;

  // ---------------------------------------------------------------- forward
  {
    // seq_lse laid out [B, L, H] and lse [B, H, L], so the two stride sets differ.
    std::vector<float> lse_s_blh(rows);
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int i = 0; i < L; ++i) lse_s_blh[(size_t(b) * L + i) * H + h] = static_cast<float>(lse_s[row_of(b, h, i)]);
    Device<T> seq_dev(scatter(out_s, ls, B, H, L, D)), out_dev(size_t(lo.size));
    Device<float> seq_lse_dev = Device<float>::raw(lse_s_blh), lse_dev(rows);
    k::PrefixAttentionForward fa{};
    fa.q = rows_of(q_dev, lq);
    fa.seq_out = S > 0 ? rows_of(seq_dev, ls) : k::AttnRows{nullptr, 0, 0, 0};
    fa.seq_lse = S > 0 ? k::AttnStats{seq_lse_dev.ptr, int64_t(L) * H, 1, H} : k::AttnStats{nullptr, 0, 0, 0};
    fa.out = c.in_place ? fa.seq_out : rows_of(out_dev, lo);
    fa.lse = {lse_dev.ptr, int64_t(H) * L, L, 1};
    CHECK_CUDA(k::prefix_attention_forward(shape, fa, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::vector<double> got_out =
        c.in_place ? gather(seq_dev.host(), ls, B, H, L, D) : gather(out_dev.host(), lo, B, H, L, D);
    const std::vector<double> got_lse = lse_dev.host();
    // Rows that see no key at all: lse exactly +inf and out exactly 0. Poisoned rows: NaN. The
    // others: relative error.
    std::vector<double> fin_got, fin_want, out_got, out_want;
    size_t empty_rows = 0, nan_rows = 0;
    bool empty_ok = true, nan_ok = true;
    for (size_t r = 0; r < rows; ++r) {
      if (poisoned[r]) {
        ++nan_rows;
        bool all_nan = std::isnan(got_lse[r]);
        for (int d = 0; d < D; ++d) all_nan &= std::isnan(got_out[r * D + d]);
        if (!all_nan && nan_ok)
          std::printf("FAIL %s: row %zu has lse_s %f: out and lse must be NaN; lse %f\n", label.c_str(), r, lse_s[r],
                      got_lse[r]);
        nan_ok &= all_nan;
        continue;
      }
      out_got.insert(out_got.end(), got_out.begin() + r * D, got_out.begin() + (r + 1) * D);
      out_want.insert(out_want.end(), out.begin() + r * D, out.begin() + (r + 1) * D);
      if (std::isinf(lse[r])) {
        ++empty_rows;
        bool zero = true;
        for (int d = 0; d < D; ++d) zero &= got_out[r * D + d] == 0;
        if (!(got_lse[r] == kInf) || !zero) {
          if (empty_ok)
            std::printf("FAIL %s: row %zu sees no key: lse %f (want +inf), out zero %d\n", label.c_str(), r, got_lse[r],
                        int(zero));
          empty_ok = false;
        }
      } else {
        fin_got.push_back(got_lse[r]);
        fin_want.push_back(lse[r]);
      }
    }
    if (empty_ok) std::printf("ok   %s forward: %zu rows with no key: lse +inf, out 0\n", label.c_str(), empty_rows);
    if (nan_ok) std::printf("ok   %s forward: %zu rows with a +inf or NaN sequence lse: NaN\n", label.c_str(), nan_rows);
    ok &= empty_ok && nan_ok;
    ok &= close(label + " forward out", out_got, out_want, kTol);
    ok &= close(label + " forward lse", fin_got, fin_want, kLseTol);
  }

  // ---------------------------------------------------------------- backward
  // Inputs: the merged out (as the forward stores it, rounded to T) and lse (float32).
  std::vector<double> out_r = out, lse_f(rows);
  round_all<T>(out_r);
  for (size_t r = 0; r < rows; ++r) lse_f[r] = static_cast<float>(lse[r]);
  // p = exp(q pk^T scale - lse), ds = p (dO pv^T - rowsum(dO * out)), dq = scale ds pk,
  // probs = p, dscores = scale ds; zero columns past the sample's prefix (all of them without one).
  const int64_t probs_ld = (P + 1) / 2 * 2 + c.probs_pad;
  std::vector<double> dq(rows * D, 0), probs(rows * size_t(probs_ld), 0), dscores(probs.size(), 0);
  std::vector<uint8_t> in_prefix(probs.size(), 0);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < L; ++i) {
        if (!task_ok(b)) continue;
        const size_t r = row_of(b, h, i);
        const int hk = h / G;
        const double delta = dot(&grad_out[r * D], &out_r[r * D], D);
        for (int j = 0; j < P; ++j) {
          const double p = std::exp(scale * dot(&q[r * D], pk_row(b, hk, j), D) - lse_f[r]);
          const double ds = p * (dot(&grad_out[r * D], pv_row(b, hk, j), D) - delta);
          probs[r * probs_ld + j] = p;
          dscores[r * probs_ld + j] = scale * ds;
          in_prefix[r * probs_ld + j] = 1;
          for (int d = 0; d < D; ++d) dq[r * D + d] += scale * ds * pk_row(b, hk, j)[d];
        }
      }
  // Split probs / dscores into the prefix columns (relative error) and the padding (exact zeros).
  auto split = [&](const std::vector<double>& v, std::vector<double>& inside, std::vector<double>& pad) {
    for (size_t e = 0; e < v.size(); ++e) (in_prefix[e] ? inside : pad).push_back(v[e]);
  };
  std::vector<double> probs_in, probs_pad, ds_in, ds_pad;
  split(probs, probs_in, probs_pad);
  split(dscores, ds_in, ds_pad);
  // dq's starting value for the accumulating run: the size of the prefix part, so both matter.
  double rms = 0;
  for (double v : dq) rms += v * v;
  rms = std::sqrt(rms / double(dq.size()));
  std::vector<double> dq0 = normal(dq.size(), rng);
  for (auto& v : dq0) v *= rms;
  round_all<T>(dq0);
  std::vector<double> dq_acc(dq.size());
  for (size_t e = 0; e < dq.size(); ++e) dq_acc[e] = dq0[e] + dq[e];

  const Layout lg = padded(B, H, L, D), ldq = blhd(B, H, L, D);
  Device<T> grad_dev(scatter(grad_out, lg, B, H, L, D)), merged_dev(scatter(out_r, lo, B, H, L, D));
  Device<float> lse_dev(lse_f);
  for (int acc = 0; acc < 2; ++acc) {
    // dq starts NaN (every element must be written) or at dq0 (it is added to).
    Device<T> dq_dev = acc ? Device<T>(scatter(dq0, ldq, B, H, L, D)) : Device<T>(size_t(ldq.size));
    Device<T> probs_dev(probs.size()), dscores_dev(probs.size());
    k::PrefixAttentionBackward ba{};
    ba.q = rows_of(q_dev, lq);
    ba.grad_out = rows_of(grad_dev, lg);
    ba.out = rows_of(merged_dev, lo);
    ba.dq = rows_of(dq_dev, ldq);
    ba.lse = {lse_dev.ptr, int64_t(H) * L, L, 1};
    ba.dq_accumulate = acc == 1;
    ba.probs = probs_dev.ptr;
    ba.dscores = dscores_dev.ptr;
    ba.probs_ld = probs_ld;
    CHECK_CUDA(k::prefix_attention_backward(shape, ba, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    const std::string l =
        label + (acc ? " backward (dq added)" : " backward") + " probs_ld=" + std::to_string(probs_ld);
    ok &= close(l + " dq", gather(dq_dev.host(), ldq, B, H, L, D), acc ? dq_acc : dq, kTol);
    std::vector<double> got_in, got_pad;
    split(probs_dev.host(), got_in, got_pad);
    ok &= close(l + " probs", got_in, probs_in, kTol);
    ok &= equal(l + " probs padding", got_pad, probs_pad);
    got_in.clear();
    got_pad.clear();
    split(dscores_dev.host(), got_in, got_pad);
    ok &= close(l + " dscores", got_in, ds_in, kTol);
    ok &= equal(l + " dscores padding", got_pad, ds_pad);
  }
  return ok;
}

// Shapes the launchers must refuse (cudaErrorInvalidValue, nothing launched).
bool rejects() {
  bool ok = true;
  auto expect = [&](bool cond, const char* what) {
    std::printf("%s rejects %s\n", cond ? "ok  " : "FAIL", what);
    ok &= cond;
  };
  expect(!k::prefix_attention_supported(peftkern::DType::kFloat32, 64), "float32");
  expect(!k::prefix_attention_supported(peftkern::DType::kBFloat16, 60), "D = 60 (not a multiple of 8)");
  expect(!k::prefix_attention_supported(peftkern::DType::kFloat16, 264), "D = 264 (> 256)");
  k::PrefixAttentionShape s{};
  s.dtype = peftkern::DType::kBFloat16;
  s.B = 1;
  s.H = 3;
  s.Hkv = 2;  // H not a multiple of Hkv
  s.L = 4;
  s.P = 5;
  s.D = 64;
  s.scale = 0.125f;
  s.num_tasks = 1;
  k::PrefixAttentionForward fa{};
  expect(k::prefix_attention_forward(s, fa, nullptr) == cudaErrorInvalidValue, "H % Hkv != 0");
  s.H = 2;
  k::PrefixAttentionBackward ba{};
  ba.probs = reinterpret_cast<void*>(uintptr_t(256));  // never dereferenced: refused first
  ba.probs_ld = 4;                                     // < P
  expect(k::prefix_attention_backward(s, ba, nullptr) == cudaErrorInvalidValue, "probs_ld < P");
  ba.probs_ld = 7;  // odd
  expect(k::prefix_attention_backward(s, ba, nullptr) == cudaErrorInvalidValue, "odd probs_ld");
  return ok;
}

}  // namespace

int main() {
  if (!launcher_test::gpu_available()) return launcher_test::kSkipped;
  int major = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  if (major < 8) {  // mma.sync bf16 needs sm_80; the launchers leave this check to their callers
    std::printf("compute capability %d.x < 8.0: skipped\n", major);
    return launcher_test::kSkipped;
  }
  std::mt19937 rng(77);
  bool ok = rejects();
  using bf16 = __nv_bfloat16;
  using f16 = __half;
  // B, H, Hkv, L, P, S, D, T, ids, in_place, probs_pad. Rows per (sample, kv head) G * L = 74, 40,
  // 50, 65: partial 64-row blocks (64: exactly one). P = 19, 70, 33, 13, 130: partial prefix tiles
  // (forward 64 keys, 32 for D = 256; backward 32, 16 for D = 256); 64: whole tiles. probs_ld past
  // the last backward tile (e.g. 19 + 40 > 32) exercises the padding loop after the tiles.
  ok &= run_case<bf16>({3, 4, 2, 37, 19, 23, 64, 2, true, false, 10}, rng);  // GQA, ids 1, 0, 2 (out of range)
  ok &= run_case<f16>({3, 4, 2, 37, 19, 23, 64, 2, true, true, 40}, rng);    // the same in place, fp16
  ok &= run_case<f16>({4, 4, 2, 20, 70, 0, 72, 2, true, false, 10}, rng);    // S = 0; ids 1, 0, 2, -1
  ok &= run_case<bf16>({2, 3, 3, 50, 70, 40, 72, 1, false, true, 6}, rng);   // no GQA, one shared prefix
  ok &= run_case<bf16>({2, 4, 2, 20, 33, 17, 128, 2, true, false, 40}, rng);
  ok &= run_case<f16>({1, 2, 2, 65, 64, 0, 128, 1, false, false, 2}, rng);   // S = 0, P a whole tile
  ok &= run_case<bf16>({2, 2, 1, 20, 13, 5, 256, 2, true, false, 20}, rng);  // D = 256, G = 2
  ok &= run_case<f16>({2, 8, 2, 16, 130, 31, 64, 1, true, false, 0}, rng);   // G = 4; ids 1 (= T: none), 0
  std::printf(ok ? "PASSED\n" : "FAILED\n");
  return ok ? 0 : 1;
}
