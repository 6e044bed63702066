// Drives the low-rank launchers directly (no torch): the adapter (gelu, residual x) in float32 and
// bfloat16, forward and backward, against a float64 reference on the host.
// Exit 0 pass, 1 fail, 77 no GPU (CTest: skipped).
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <random>
#include <vector>

#include "kernels/lowrank.h"

using peftkern::Activation;
using peftkern::DType;
namespace k = peftkern::kernels;

namespace {

#define CHECK_CUDA(expr)                                                              \
  do {                                                                                \
    const cudaError_t e_ = (expr);                                                    \
    if (e_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

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
  for (auto* v : {&p.x, &p.wd, &p.bd, &p.wu, &p.bu, &p.g})
    for (auto& e : *v) e = __bfloat162float(__float2bfloat16(float(e)));
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

template <typename T> struct Device {
  T* ptr = nullptr;
  size_t n = 0;
  explicit Device(const std::vector<double>& host) : n(host.size()) {
    std::vector<T> tmp(n);
    for (size_t i = 0; i < n; ++i) tmp[i] = T(float(host[i]));
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(T) + 16));
    CHECK_CUDA(cudaMemcpy(ptr, tmp.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  explicit Device(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(T) + 16));
    CHECK_CUDA(cudaMemset(ptr, 0xFF, n * sizeof(T)));  // NaN: unwritten elements fail
  }
  ~Device() { cudaFree(ptr); }
  std::vector<double> host() const {
    std::vector<T> tmp(n);
    CHECK_CUDA(cudaMemcpy(tmp.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = double(float(tmp[i]));
    return out;
  }
};

bool close(const char* what, const std::vector<double>& got, const std::vector<double>& want, double tol) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      std::printf("FAIL %s: element %zu is %f\n", what, i, got[i]);
      return false;
    }
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  const double err = std::sqrt(num / den);
  std::printf("%s %s: relative error %.3g (tolerance %.0e)\n", err <= tol ? "ok  " : "FAIL", what, err, tol);
  return err <= tol;
}

template <typename T>
bool run_case(DType dtype, int rows, int d, int r, bool backward, double tol, std::mt19937& rng) {
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

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 rng(1234);
  bool ok = true;
  ok &= run_case<float>(DType::kFloat32, 130, 100, 24, true, 1e-5, rng);
  ok &= run_case<float>(DType::kFloat32, 64, 256, 64, true, 1e-5, rng);
  ok &= run_case<__nv_bfloat16>(DType::kBFloat16, 200, 264, 40, true, 1e-2, rng);
  std::printf(ok ? "PASSED\n" : "FAILED\n");
  return ok ? 0 : 1;
}
