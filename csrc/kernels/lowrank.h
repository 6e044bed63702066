// Launchers of the low-rank update kernels shared by the bottleneck adapter and LoRA. Raw
// pointers, sizes and a stream; no torch.
//
//   z = drop(x) @ w_down^T + b_down                    [rows, r]      x [rows, n_in], w_down [r, n_in]
//   y = res + scale * g * (act(z) @ w_up^T + b_up)     [rows, n_out]  w_up [n_out, r]
//
// g is an optional per-row gate [rows] (UniPELT's sigma(W_g x), one scalar per token; absent = 1).
//
// Adapter: n_in = n_out = d; res = x or the residual; act = gelu/relu/silu; no dropout.
// LoRA:    w_down = lora_A, w_up = lora_B, act = identity, scale = scaling, res = y = the base
//          product x @ W^T + b (updated in place), dropout on x.
// Matrices are dense row-major; biases may be null. Launchers enqueue no work for rows == 0 (the
// backward then zeroes the requested weight gradients) and allocate nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dropout.h"
#include "kernel_types.h"

namespace peftkern::kernels {

// The fused kernels handle r = 1..kLowRankMaxFusedRank (padded on chip to 16, 32, 64, 128 or 256).
constexpr int kLowRankMaxFusedRank = 256;
// Rows per block of the forward kernel (multi-adapter segments are cut into blocks of this size).
constexpr int kLowRankRowsPerBlock = 64;

// Multi-adapter batches (one base, many adapters, each row its own): rows grouped by adapter on
// the device (no host sync). Segment l < L (adapter l) owns positions seg_start[l] .. seg_start[l+1]
// of `order` and blocks block_start[l] .. block_start[l+1] of the grid (64 rows per block), so each
// block reads one adapter's weights once. Segment L holds the rows of no adapter: its blocks copy
// res into y for those rows (give it no block when res is y: the rows are then not touched).
struct AdapterSegments {
  int num_adapters = 0;                        // L; 0 = one adapter for every row
  const int64_t* order = nullptr;              // [rows] row indices, grouped by segment
  const int64_t* seg_start = nullptr;          // [L + 2]
  const int64_t* block_start = nullptr;        // [L + 2]: exclusive prefix sum of the segments' blocks
  int64_t w_down_stride = 0, w_up_stride = 0;  // elements between consecutive adapters' weights
  int64_t b_down_stride = 0, b_up_stride = 0;  // ... and biases (when given)
  const float* scales = nullptr;               // [L] per-adapter scale, or null: `scale` for all
};

struct LowRankForwardArgs {
  DType dtype;
  Activation activation;
  float scale;
  int64_t rows;
  int n_in, n_out, r;
  const void* x;
  const void* w_down;
  const void* b_down;  // [r] or null
  const void* w_up;
  const void* b_up;  // [n_out] or null
  const void* res;   // [rows, n_out]; may be y itself
  void* y;           // [rows, n_out]
  void* z;           // [rows, r] pre-activation, saved for the backward; null in inference
  const void* gate = nullptr;  // [rows] per-row gate g (by original row index), or null
  DropoutArgs dropout;
  AdapterSegments segments;  // w_down [L, r, n_in], w_up [L, n_out, r]; z rows of no adapter untouched
};

// Dynamic shared memory per block of the fused kernels for this dtype and rank (1..256): the
// forward's, and the larger of the backward's two. The host compares them with the device's
// per-block limit (sm_86/sm_89: 99 KB, sm_80: 163 KB, sm_90: 227 KB) and takes the composite where
// they do not fit.
int lowrank_forward_smem_bytes(DType dtype, int r);
int lowrank_backward_smem_bytes(DType dtype, int r);

// One kernel: each 64-row block reads its rows of x once (dropout applied on chip), keeps act(z)
// in shared memory, and writes its rows of y once; res is read once (L2-resident when it is x).
cudaError_t lowrank_forward(const LowRankForwardArgs& args, cudaStream_t stream);

enum class DxMode : int {
  kWrite = 0,         // dx  = mask * (dz @ w_down)
  kWritePlusGradOut,  // dx  = mask * (dz @ w_down) + grad_out   (the residual was x; n_in == n_out)
  kAccumulate,        // dx += mask * (dz @ w_down)              (dx already holds another term)
};

struct LowRankBackwardArgs {
  DType dtype;
  Activation activation;
  float scale;
  int64_t rows;
  int n_in, n_out, r;
  int num_sms;           // of the device, to size the weight-gradient split
  const void* grad_out;  // [rows, n_out]
  const void* x;         // [rows, n_in]
  const void* z;         // the forward's saved pre-activation [rows, r]
  const void* w_down;
  const void* w_up;
  DxMode dx_mode;
  // Outputs; null = not requested, and then not computed.
  void* dx;             // [rows, n_in]
  void* dw_down;        // [r, n_in]
  void* db_down;        // [r]
  void* dw_up;          // [n_out, r]
  void* db_up;          // [n_out]
  // The forward's per-row gate [rows] (null: none). With it, every gradient above carries g, and
  // dgate [rows] (float32; null = not requested) gets scale * <grad_out @ w_up, act(z)> per row: the
  // caller adds scale * grad_out @ b_up when there is a b_up.
  const void* gate = nullptr;
  float* dgate = nullptr;
  DropoutArgs dropout;  // p and seed_offset of the forward
  void* workspace;
  size_t workspace_bytes;
};

// Bytes of scratch lowrank_backward needs for these args.
size_t lowrank_backward_workspace_bytes(const LowRankBackwardArgs& args);

// Passes over the [rows, n_in/n_out] tensors: grad_out read twice, x read once, dx written once
// (and read once in kAccumulate mode).
//   1. per row block: dz = scale * g * (grad_out @ w_up) * act'(z), h = g * act(z)   (rank-r
//      scratch), and dgate
//   2. per (column block, row split): dx from dz @ w_down; partial sums of grad_out^T h,
//      drop(x)^T dz and the bias sums, all from the same tiles
//   3. a deterministic reduction of the partials into dw_up, dw_down, db_up, db_down
cudaError_t lowrank_backward(const LowRankBackwardArgs& args, cudaStream_t stream);

}  // namespace peftkern::kernels
