// Shared by the .cu files of csrc/: error checking, dtype conversion, warp and block sums.
// Plain CUDA, no torch headers, so that `nvcc -c` of any .cu needs only the CUDA toolkit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

// Every CUDA call of a launcher goes through this: a failure names the file, the line and the
// call. The exception crosses into bindings.cpp, where pybind11 turns it into a RuntimeError.
#define CUDA_CHECK(call)                                                                   \
  do {                                                                                     \
    cudaError_t err_ = (call);                                                             \
    if (err_ != cudaSuccess) {                                                             \
      throw std::runtime_error(std::string(__FILE__) + ":" + std::to_string(__LINE__) +    \
                               ": " #call " failed: " + cudaGetErrorString(err_));        \
    }                                                                                      \
  } while (0)

// Shape and argument checks of the launchers: the message names what was wrong.
#define HOST_CHECK(cond, msg)                                                              \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      throw std::invalid_argument(std::string(__FILE__) + ":" + std::to_string(__LINE__) + \
                                  ": " + (msg));                                           \
    }                                                                                      \
  } while (0)

// Runs the statements with T bound to the element type of `dtype`.
#define DISPATCH_DTYPE(dtype, T, ...)                                                      \
  switch (dtype) {                                                                         \
    case ::mllm::DType::kFloat32: {                                                        \
      using T = float;                                                                     \
      __VA_ARGS__;                                                                         \
    } break;                                                                               \
    case ::mllm::DType::kFloat16: {                                                        \
      using T = __half;                                                                    \
      __VA_ARGS__;                                                                         \
    } break;                                                                               \
    case ::mllm::DType::kBFloat16: {                                                       \
      using T = __nv_bfloat16;                                                             \
      __VA_ARGS__;                                                                         \
    } break;                                                                               \
    default:                                                                               \
      HOST_CHECK(false, "unknown dtype tag " + std::to_string(static_cast<int>(dtype)));   \
  }

namespace mllm {

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x must be a multiple of 32 (and at
// most 1024); `scratch` holds 32 floats of shared memory. The leading barrier lets one scratch
// serve consecutive calls.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_sum(lane < num_warps ? scratch[lane] : 0.0f);
}

}  // namespace mllm
