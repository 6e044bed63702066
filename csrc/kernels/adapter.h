// Launchers of the fused bottleneck-adapter kernels. Raw pointers, sizes and a stream; no torch.
//
//   z   = x @ w_down^T + b_down                     [rows, r]
//   out = res + scale * (act(z) @ w_up^T + b_up)    [rows, d], res = residual or x
//
// Every matrix is dense row-major: x, residual, out, grad_out [rows, d]; w_down [r, d];
// w_up [d, r]; z [rows, r]. Biases may be null. Launchers return the launch status and enqueue no
// work for rows == 0; they allocate nothing (the backward takes a caller-owned workspace).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"

namespace peftkern::kernels {

// The fused kernels handle bottleneck sizes 1..kAdapterMaxFusedRank (r is padded on chip to the
// next of 16, 32, 64, 128, 256); larger r is the caller's to route elsewhere.
constexpr int kAdapterMaxFusedRank = 256;

struct AdapterForwardArgs {
  DType dtype;
  Activation activation;
  float scale;
  int64_t rows;
  int d, r;
  const void* x;
  const void* w_down;
  const void* b_down;    // [r] or null
  const void* w_up;
  const void* b_up;      // [d] or null
  const void* residual;  // [rows, d] or null: null adds x
  void* out;
  void* z;  // [rows, r] pre-activation, saved for the backward; null in inference
};

// One kernel: each block reads its rows of x once for the down-projection, keeps act(z) on chip,
// and writes its rows of out once (the residual add re-reads the rows, which are L2-resident).
cudaError_t adapter_forward(const AdapterForwardArgs& args, cudaStream_t stream);

struct AdapterBackwardArgs {
  DType dtype;
  Activation activation;
  float scale;
  int64_t rows;
  int d, r;
  int num_sms;  // of the device, to size the weight-gradient split
  const void* grad_out;
  const void* x;
  const void* z;  // the forward's saved pre-activation
  const void* w_down;
  const void* w_up;
  bool grad_out_into_dx;  // dx += grad_out (the residual was x)
  // Outputs; null = not requested, and then not computed.
  void* dx;       // [rows, d]
  void* dw_down;  // [r, d]
  void* db_down;  // [r]
  void* dw_up;    // [d, r]
  void* db_up;    // [d]
  void* workspace;
  size_t workspace_bytes;
};

// Bytes of scratch adapter_backward needs for these args (depends on dtype, sizes, num_sms and
// which outputs are requested).
size_t adapter_backward_workspace_bytes(const AdapterBackwardArgs& args);

// Passes over the [rows, d] tensors: grad_out read twice, x read once, dx written once.
//   1. per row block: dz = scale * (grad_out @ w_up) * act'(z), h = act(z)   (rank-r scratch)
//   2. per (d-column block, row split): dx = dz @ w_down (+ grad_out); partial sums of
//      grad_out^T h, x^T dz and the bias sums, all from the same tiles
//   3. a small deterministic reduction of the partials into dw_up, dw_down, db_up, db_down
cudaError_t adapter_backward(const AdapterBackwardArgs& args, cudaStream_t stream);

}  // namespace peftkern::kernels
