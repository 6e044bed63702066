// Counter-based dropout masks (Philox4x32-10), the same function on the CPU and on the GPU, so a
// (seed, offset) pair gives one mask everywhere and a backward regenerates the forward's mask.
// Torch-free; compiles as host code (g++) and as host+device code (nvcc).
#pragma once

#include <cstdint>

#include "kernel_types.h"

namespace peftkern {

PEFTKERN_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = uint64_t(a) * b;
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al. 2011) on counter c, key (k0, k1).
PEFTKERN_HD void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  for (int i = 0; i < 10; ++i) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c[0], hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c[2], hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Dropout of the four elements (row, 4q .. 4q+3) of a matrix: each is kept (factor 1/(1-p)) when
// its uniform draw in [0, 1) is >= p, else dropped (factor 0). The counter is (q, row, offset), the
// key the seed; rows must be < 2^32.
PEFTKERN_HD void dropout_factors4(uint64_t seed, uint64_t offset, int64_t row, int64_t q, float p, float (&factor)[4]) {
  uint32_t c[4] = {uint32_t(q), uint32_t(row), uint32_t(offset >> 32), uint32_t(offset)};
  philox4x32_10(c, uint32_t(seed), uint32_t(seed >> 32));
  const float keep = 1.f / (1.f - p);
  for (int i = 0; i < 4; ++i) factor[i] = float(c[i] >> 8) * (1.f / 16777216.f) >= p ? keep : 0.f;
}

}  // namespace peftkern
