// Shared by layernorm.cu and rmsnorm.cu: the register-row launch shape and the column sum that
// turns per-block partial weight gradients into the weight gradient.
#pragma once

#include "common.cuh"

namespace mllm {

// Elements per thread of a row: a power of two from 2 to 32, fixed at compile time so that the
// row stays in registers.
inline int norm_items(int hidden, int threads) {
  int items = 2;
  while (items * threads < hidden) items *= 2;
  return items;
}

#define DISPATCH_NORM_ITEMS(items, ITEMS, ...)                                           \
  switch (items) {                                                                       \
    case 2: {                                                                            \
      constexpr int ITEMS = 2;                                                           \
      __VA_ARGS__;                                                                       \
    } break;                                                                             \
    case 4: {                                                                            \
      constexpr int ITEMS = 4;                                                           \
      __VA_ARGS__;                                                                       \
    } break;                                                                             \
    case 8: {                                                                            \
      constexpr int ITEMS = 8;                                                           \
      __VA_ARGS__;                                                                       \
    } break;                                                                             \
    case 16: {                                                                           \
      constexpr int ITEMS = 16;                                                          \
      __VA_ARGS__;                                                                       \
    } break;                                                                             \
    case 32: {                                                                           \
      constexpr int ITEMS = 32;                                                          \
      __VA_ARGS__;                                                                       \
    } break;                                                                             \
    default:                                                                             \
      HOST_CHECK(false, "no norm kernel for " + std::to_string(items) + " items/thread"); \
  }

inline void check_norm_shape(int64_t rows, int hidden) {
  HOST_CHECK(rows >= 1 && rows <= INT32_MAX,
             "rows=" + std::to_string(rows) + ": must be in [1, 2^31)");
  HOST_CHECK(hidden >= 1 && hidden <= kNormMaxHidden,
             "hidden=" + std::to_string(hidden) + ": must be in [1, " +
                 std::to_string(kNormMaxHidden) + "]; use the PyTorch fallback above that");
}

// out[c] = sum over b of partial[b, c], in a fixed order (deterministic).
template <int UNUSED = 0>
__global__ void column_sum_kernel(const float* __restrict__ partial, float* __restrict__ out,
                                  int blocks, int hidden) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= hidden) return;
  float sum = 0.0f;
  for (int b = 0; b < blocks; ++b) sum += partial[static_cast<int64_t>(b) * hidden + c];
  out[c] = sum;
}

inline void column_sum(const float* partial, float* out, int blocks, int hidden,
                       cudaStream_t stream) {
  column_sum_kernel<<<ceil_div(hidden, 256), 256, 0, stream>>>(partial, out, blocks, hidden);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace mllm
