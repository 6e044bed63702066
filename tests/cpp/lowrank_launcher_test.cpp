// Drives the low-rank launchers directly (no torch), against float64 references on the host:
// the adapter (gelu, residual x) in float32 and bfloat16, forward and backward; and LoRA
// (identity, rectangular, update added in place, dropout, dx accumulated) in float32.
// Exit 0 pass, 1 fail, 77 no GPU (CTest: skipped).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/lowrank.h"
#include "kernels/philox.h"
#include "launcher_test.h"

using launcher_test::close;
using launcher_test::Device;
using peftkern::Activation;
using peftkern::DType;
namespace k = peftkern::kernels;

namespace {

double gelu(double z) { return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0))); }
double gelu_grad(double z) {
  return 0.5 * (1 + std::erf(z / std::sqrt(2.0))) + z * std::exp(-0.5 * z * z) / std::sqrt(2 * M_PI);
}

struct Problem {
  int rows, d, r;
  float scale;
  std::vector<double> x, wd, bd, wu, bu, g;
};

Problem make_problem(int rows, int d, int r, std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  Problem p{rows, d, r, 0.5f, {}, {}, {}, {}, {}, {}};
  auto fill = [&](std::vector<double>& v, size_t count, double s) {
    v.resize(count);
    for (auto& e : v) e = n(rng) * s;
  };
  fill(p.x, size_t(rows) * d, 1);
  fill(p.wd, size_t(r) * d, 1 / std::sqrt(double(d)));
  fill(p.bd, r, 0.1);
  fill(p.wu, size_t(d) * r, 1 / std::sqrt(double(r)));
  fill(p.bu, d, 0.1);
  fill(p.g, size_t(rows) * d, 1);
  for (auto& e : p.g) e += 0.5;
  return p;
}

// Rounds every input to bf16 so the float64 reference sees exactly what the kernel sees.
void round_to_bf16(Problem& p) {
  for (auto* v : {&p.x, &p.wd, &p.bd, &p.wu, &p.bu, &p.g}) launcher_test::round_all<__nv_bfloat16>(*v);
}

struct Reference {
  std::vector<double> z, out, dx, dwd, dbd, dwu, dbu;
};

Reference reference(const Problem& p) {
  const int R = p.rows, D = p.d, r = p.r;
  Reference ref;
  ref.z.assign(size_t(R) * r, 0);
  ref.out.assign(size_t(R) * D, 0);
  ref.dx.assign(size_t(R) * D, 0);
  ref.dwd.assign(size_t(r) * D, 0);
  ref.dbd.assign(r, 0);
  ref.dwu.assign(size_t(D) * r, 0);
  ref.dbu.assign(D, 0);
  std::vector<double> dz(r);
  for (int i = 0; i < R; ++i) {
    for (int k2 = 0; k2 < r; ++k2) {
      double s = p.bd[k2];
      for (int j = 0; j < D; ++j) s += p.x[size_t(i) * D + j] * p.wd[size_t(k2) * D + j];
      ref.z[size_t(i) * r + k2] = s;
    }
    for (int j = 0; j < D; ++j) {
      double s = p.bu[j];
      for (int k2 = 0; k2 < r; ++k2) s += gelu(ref.z[size_t(i) * r + k2]) * p.wu[size_t(j) * r + k2];
      ref.out[size_t(i) * D + j] = p.x[size_t(i) * D + j] + p.scale * s;
    }
    for (int k2 = 0; k2 < r; ++k2) {
      double dh = 0;
      for (int j = 0; j < D; ++j) dh += p.g[size_t(i) * D + j] * p.wu[size_t(j) * r + k2];
      dz[k2] = p.scale * dh * gelu_grad(ref.z[size_t(i) * r + k2]);
      ref.dbd[k2] += dz[k2];
    }
    for (int j = 0; j < D; ++j) {
      const double gij = p.g[size_t(i) * D + j];
      double s = gij;  // the residual is x
      for (int k2 = 0; k2 < r; ++k2) {
        s += dz[k2] * p.wd[size_t(k2) * D + j];
        ref.dwd[size_t(k2) * D + j] += dz[k2] * p.x[size_t(i) * D + j];
        ref.dwu[size_t(j) * r + k2] += p.scale * gij * gelu(ref.z[size_t(i) * r + k2]);
      }
      ref.dx[size_t(i) * D + j] = s;
      ref.dbu[j] += p.scale * gij;
    }
  }
  return ref;
}

template <typename T> bool run_case(DType dtype, int rows, int d, int r, bool backward, double tol, std::mt19937& rng) {
  Problem p = make_problem(rows, d, r, rng);
  if (dtype == DType::kBFloat16) round_to_bf16(p);
  const Reference ref = reference(p);
  Device<T> x(p.x), wd(p.wd), bd(p.bd), wu(p.wu), bu(p.bu), g(p.g);
  Device<T> out{size_t(rows) * d}, z{size_t(rows) * r};
  k::LowRankForwardArgs fa{};
  fa.dtype = dtype;
  fa.activation = Activation::kGelu;
  fa.scale = p.scale;
  fa.rows = rows;
  fa.n_in = fa.n_out = d;
  fa.r = r;
  fa.x = fa.res = x.ptr;
  fa.w_down = wd.ptr;
  fa.b_down = bd.ptr;
  fa.w_up = wu.ptr;
  fa.b_up = bu.ptr;
  fa.y = out.ptr;
  fa.z = z.ptr;
  CHECK_CUDA(k::lowrank_forward(fa, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  char label[96];
  std::snprintf(label, sizeof label, "%s rows=%d d=%d r=%d", dtype == DType::kFloat32 ? "f32" : "bf16", rows, d, r);
  bool ok = close((std::string(label) + " out").c_str(), out.host(), ref.out, tol);
  ok &= close((std::string(label) + " z").c_str(), z.host(), ref.z, tol);
  if (!backward) return ok;

  Device<T> dx{size_t(rows) * d}, dwd{size_t(r) * d}, dbd{size_t(r)}, dwu{size_t(d) * r}, dbu{size_t(d)};
  k::LowRankBackwardArgs ba{};
  ba.dtype = dtype;
  ba.activation = Activation::kGelu;
  ba.scale = p.scale;
  ba.rows = rows;
  ba.n_in = ba.n_out = d;
  ba.r = r;
  ba.num_sms = 132;
  ba.grad_out = g.ptr;
  ba.x = x.ptr;
  ba.z = z.ptr;
  ba.w_down = wd.ptr;
  ba.w_up = wu.ptr;
  ba.dx_mode = k::DxMode::kWritePlusGradOut;
  ba.dx = dx.ptr;
  ba.dw_down = dwd.ptr;
  ba.db_down = dbd.ptr;
  ba.dw_up = dwu.ptr;
  ba.db_up = dbu.ptr;
  ba.workspace_bytes = k::lowrank_backward_workspace_bytes(ba);
  CHECK_CUDA(cudaMalloc(&ba.workspace, ba.workspace_bytes));
  CHECK_CUDA(k::lowrank_backward(ba, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaFree(ba.workspace));
  ok &= close((std::string(label) + " dx").c_str(), dx.host(), ref.dx, tol);
  ok &= close((std::string(label) + " dw_down").c_str(), dwd.host(), ref.dwd, tol);
  ok &= close((std::string(label) + " db_down").c_str(), dbd.host(), ref.dbd, tol);
  ok &= close((std::string(label) + " dw_up").c_str(), dwu.host(), ref.dwu, tol);
  ok &= close((std::string(label) + " db_up").c_str(), dbu.host(), ref.dbu, tol);
  return ok;
}

// LoRA: y = y0 + s * (drop(x) @ A^T) @ B^T in place; backward accumulates into dx0.
bool run_lora_case(int rows, int n_in, int n_out, int r, float p, std::mt19937& rng) {
  std::normal_distribution<double> n(0, 1);
  auto make = [&](size_t count, double sc) {
    std::vector<double> v(count);
    for (auto& e : v) e = n(rng) * sc;
    return v;
  };
  const double s = 0.5;
  const auto x = make(size_t(rows) * n_in, 1), A = make(size_t(r) * n_in, 1 / std::sqrt(double(n_in)));
  const auto B = make(size_t(n_out) * r, 1 / std::sqrt(double(r))), y0 = make(size_t(rows) * n_out, 1);
  const auto g = make(size_t(rows) * n_out, 1), dx0 = make(size_t(rows) * n_in, 1);
  const uint64_t seed = 0x1234abcdULL, offset = 44;
  std::vector<double> xd(x.size()), mask(x.size(), 1.0);
  for (int i = 0; i < rows; ++i)
    for (int c = 0; c < n_in; c += 4) {
      float f[4];
      peftkern::dropout_factors4(seed, offset, i, c / 4, p, f);
      for (int e = 0; e < 4 && c + e < n_in; ++e) mask[size_t(i) * n_in + c + e] = p > 0 ? f[e] : 1.0;
    }
  for (size_t i = 0; i < x.size(); ++i) xd[i] = x[i] * mask[i];
  std::vector<double> u(size_t(rows) * r, 0), y = y0, dx = dx0, dA(size_t(r) * n_in, 0), dB(size_t(n_out) * r, 0);
  for (int i = 0; i < rows; ++i) {
    std::vector<double> v(r, 0);
    for (int k2 = 0; k2 < r; ++k2) {
      for (int j = 0; j < n_in; ++j) u[size_t(i) * r + k2] += xd[size_t(i) * n_in + j] * A[size_t(k2) * n_in + j];
      for (int o = 0; o < n_out; ++o) v[k2] += s * g[size_t(i) * n_out + o] * B[size_t(o) * r + k2];
    }
    for (int o = 0; o < n_out; ++o)
      for (int k2 = 0; k2 < r; ++k2) {
        y[size_t(i) * n_out + o] += s * u[size_t(i) * r + k2] * B[size_t(o) * r + k2];
        dB[size_t(o) * r + k2] += s * g[size_t(i) * n_out + o] * u[size_t(i) * r + k2];
      }
    for (int j = 0; j < n_in; ++j)
      for (int k2 = 0; k2 < r; ++k2) {
        dx[size_t(i) * n_in + j] += mask[size_t(i) * n_in + j] * v[k2] * A[size_t(k2) * n_in + j];
        dA[size_t(k2) * n_in + j] += v[k2] * xd[size_t(i) * n_in + j];
      }
  }

  Device<float> dxv(x), dAv(A), dBv(B), dyv(y0), dgv(g), ddx(dx0);
  Device<float> dz{size_t(rows) * r}, gA{size_t(r) * n_in}, gB{size_t(n_out) * r};
  int64_t* so = nullptr;
  CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&so), 2 * sizeof(int64_t)));
  k::LowRankForwardArgs fa{};
  fa.dtype = DType::kFloat32;
  fa.activation = Activation::kIdentity;
  fa.scale = float(s);
  fa.rows = rows;
  fa.n_in = n_in;
  fa.n_out = n_out;
  fa.r = r;
  fa.x = dxv.ptr;
  fa.w_down = dAv.ptr;
  fa.w_up = dBv.ptr;
  fa.res = fa.y = dyv.ptr;
  fa.z = dz.ptr;
  fa.dropout.p = p;
  fa.dropout.philox.seed = seed;
  fa.dropout.philox.offset = offset;
  fa.dropout.seed_offset_out = so;
  CHECK_CUDA(k::lowrank_forward(fa, nullptr));

  k::LowRankBackwardArgs ba{};
  ba.dtype = DType::kFloat32;
  ba.activation = Activation::kIdentity;
  ba.scale = float(s);
  ba.rows = rows;
  ba.n_in = n_in;
  ba.n_out = n_out;
  ba.r = r;
  ba.num_sms = 132;
  ba.grad_out = dgv.ptr;
  ba.x = dxv.ptr;
  ba.z = dz.ptr;
  ba.w_down = dAv.ptr;
  ba.w_up = dBv.ptr;
  ba.dx_mode = k::DxMode::kAccumulate;
  ba.dx = ddx.ptr;
  ba.dw_down = gA.ptr;
  ba.dw_up = gB.ptr;
  ba.dropout.p = p;
  ba.dropout.seed_offset = so;
  ba.workspace_bytes = k::lowrank_backward_workspace_bytes(ba);
  CHECK_CUDA(cudaMalloc(&ba.workspace, ba.workspace_bytes));
  CHECK_CUDA(k::lowrank_backward(ba, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaFree(ba.workspace));
  CHECK_CUDA(cudaFree(so));
  char label[96];
  std::snprintf(label, sizeof label, "lora f32 rows=%d in=%d out=%d r=%d p=%.2f", rows, n_in, n_out, r, p);
  const std::string l(label);
  bool ok = close((l + " y").c_str(), dyv.host(), y, 1e-5);
  ok &= close((l + " u").c_str(), dz.host(), u, 1e-5);
  ok &= close((l + " dx").c_str(), ddx.host(), dx, 1e-5);
  ok &= close((l + " d lora_A").c_str(), gA.host(), dA, 1e-5);
  ok &= close((l + " d lora_B").c_str(), gB.host(), dB, 1e-5);
  return ok;
}

}  // namespace

int main() {
  if (!launcher_test::gpu_available()) return launcher_test::kSkipped;
  std::mt19937 rng(1234);
  bool ok = true;
  ok &= run_case<float>(DType::kFloat32, 130, 100, 24, true, 1e-5, rng);
  ok &= run_case<float>(DType::kFloat32, 64, 256, 64, true, 1e-5, rng);
  ok &= run_case<__nv_bfloat16>(DType::kBFloat16, 200, 264, 40, true, 1e-2, rng);
  ok &= run_lora_case(150, 72, 200, 16, 0.0f, rng);
  ok &= run_lora_case(97, 130, 64, 8, 0.3f, rng);
  std::printf(ok ? "PASSED\n" : "FAILED\n");
  return ok ? 0 : 1;
}
