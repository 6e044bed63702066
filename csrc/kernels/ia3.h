// Launchers of the (IA)^3 backward kernels (Liu et al. 2022): column reductions over [rows, cols]
// for the gradient of a learned per-column scale l. No torch. Deterministic: each CTA reduces a fixed
// row split into a float32 partial [splits, cols] (the caller's workspace), a finalize kernel sums
// the splits in order. float32 accumulation for every dtype; 64-bit offsets.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernel_types.h"

namespace peftkern::kernels {

// grad_scale[c] = sum_t a[t, c] * b[t, c], written in dtype, in one of two modes:
//   output scale (divide_by_scale): a = the op's output l * z, b = grad_out; the sum is divided by
//     l[c]. The rescued columns (l[c] zero or |l[c]| < rescue_below, inf or NaN) are left unwritten
//     (ia3_zero_scale_grad writes them).
//   input scale (scale_a_in_place): a = grad_h = grad_out @ W, b = x; a is rescaled in place to
//     grad_x = a * l while it is read (one pass over both).
struct IA3ColumnArgs {
  DType dtype;
  int64_t rows, cols;
  int num_sms;        // sizes the row splits (ia3_column_splits)
  void* a;            // [rows, cols], contiguous
  const void* b;      // [rows, cols], contiguous
  const void* scale;  // l [cols]
  bool divide_by_scale = false;
  bool scale_a_in_place = false;
  float rescue_below = 0.f;
  float* partials = nullptr;  // workspace [ia3_column_splits(rows, cols, num_sms), cols] float32
  void* grad_scale;           // [cols]
};
int64_t ia3_column_splits(int64_t rows, int64_t cols, int num_sms);
// rows == 0 launches nothing (the caller writes the zero gradient).
cudaError_t ia3_column_grad(const IA3ColumnArgs& args, cudaStream_t stream);

// The output-scale columns the division cannot recover (l[j] zero or |l[j]| < rescue_below, inf, NaN):
//   grad_scale[j] = sum_t grad_out[t, j] * (x[t] . weight[j] + bias[j])
// A CTA per (column, row split) writes partials[split, j]; one whose l[j] is not rescued exits at once,
// so the kernels are launched every backward (no host read of l: graph-capture safe); a finalize sums
// each rescued column's splits in order (deterministic). A rescued column costs a pass over x
// (rows x n_in reads, scalar): slow per rescued column, meant for the rare zero. rows == 0 launches
// nothing (the caller writes the zero gradient).
struct IA3ZeroScaleArgs {
  DType dtype;
  int64_t rows, n_in, n_out;
  const void* x;         // [rows, n_in], contiguous
  const void* weight;    // [n_out, n_in], any strides (in elements)
  int64_t w_row_stride, w_col_stride;
  const void* bias;      // [n_out] or null
  const void* grad_out;  // [rows, n_out], contiguous
  const void* scale;     // l [n_out]
  float rescue_below;
  float* partials = nullptr;  // workspace [ia3_zero_scale_splits(rows), n_out] float32
  void* grad_scale;           // [n_out]
};
int64_t ia3_zero_scale_splits(int64_t rows);
cudaError_t ia3_zero_scale_grad(const IA3ZeroScaleArgs& args, cudaStream_t stream);

}  // namespace peftkern::kernels
