// A CPU emulator of the part of CUDA that csrc/ uses, so that the kernels themselves (not a
// PyTorch double of them) run and are checked on machines without a GPU, CI included.
//
// tests/kernel_emulator.py rewrites each `kernel<<<grid, block, smem, stream>>>(args)` of the
// csrc/ sources into a call of emu::Launch and compiles them with g++, with this directory
// first on the include path, so that <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h> are
// the stand-ins here. What runs is the kernels' own code, thread by thread:
//
// - every CUDA thread of a block is a fiber (its own stack and registers) on one OS thread;
//   the blocks of a grid run one after another;
// - a fiber runs until it reaches __syncthreads() or a warp shuffle, then the next fiber runs;
//   a barrier opens when every thread of the block that has not returned waits at it, and a
//   shuffle completes when every thread of the warp that has not returned waits at one;
// - a thread that waits at a barrier while a thread of its block waits at a shuffle (or the
//   other way round), a shuffle whose mask names a thread that has returned or does not exist,
//   and a launch with a block or grid that CUDA would refuse are errors with a message;
// - the order in which threads (and blocks) take their turns is set by emu::set_schedule, so
//   the same launch can be run in several orders, warps in step or far apart: a kernel whose
//   result depends on it has a race (a missing __syncthreads, or a block reading what another
//   block writes).
//
// What it does not show: speed, occupancy, register spills, shared-memory limits, memory
// ordering beyond the barriers, and anything about the real hardware's floating point (exp2f
// and the like come from the C library here). `__shared__` variables are statics: shared by
// the threads of a block and, since blocks run one at a time, private to it; each block starts
// with them poisoned (see below).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <utility>

// ------------------------------------------------------------------------------------------
// qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory is static storage in a section of its own, which the scheduler fills with 0xff
// bytes (a NaN in every float type) before each block: a read of shared memory no thread of the
// block wrote shows up as NaN, as garbage would on a GPU.
#define __shared__ static __attribute__((section("emu_shared")))

// ------------------------------------------------------------------------------------------
// built-in variables and vector types

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------
// fp16 and bf16: storage types with round-to-nearest-even conversions

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, sizeof f);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);  // round to nearest even, as the GPU
  __half h;
  std::memcpy(&h.bits, &f, sizeof f);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}

// ------------------------------------------------------------------------------------------
// device maths that C++ lacks or spells otherwise

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }

// ------------------------------------------------------------------------------------------
// runtime API: errors, streams

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
typedef struct CUstream_st* cudaStream_t;

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace emu {

// ------------------------------------------------------------------------------------------
// scheduler (emu.cpp)

// The order threads take turns in. `order` 0: warps, lanes and blocks in index order; 1: in
// reverse; any other value: a pseudo-random order drawn from it. With `warps_apart` false the
// warps of a block advance together, one shuffle at a time; with it true each warp in turn runs
// on to its next __syncthreads before the next warp starts, so a warp that should wait for the
// others at a barrier but does not gets ahead of them.
void set_schedule(unsigned order, bool warps_apart);

// Runs `body` once per thread of every block of the grid (see the top of this file). A launch
// CUDA would refuse sets the error cudaGetLastError returns; a fault of the emulated threads
// (a barrier or shuffle they cannot all reach) throws std::runtime_error naming the block and
// threads.
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

// The calling thread's part of a warp shuffle: `bits` its value, `src_lane` the lane it reads.
// Returns that lane's value.
uint64_t shuffle(unsigned mask, uint64_t bits, int src_lane, const char* op);

// What `kernel<<<grid, block, smem, stream>>>(args...)` becomes.
struct Launch {
  dim3 grid;
  dim3 block;
  Launch(dim3 grid_, dim3 block_, size_t = 0, cudaStream_t = nullptr)
      : grid(grid_), block(block_) {}
  template <typename F, typename... Args>
  void operator()(F kernel, Args&&... args) const {
    auto params = std::make_tuple(std::forward<Args>(args)...);  // evaluated once, as CUDA does
    run_grid(grid, block, [&] { std::apply(kernel, params); });  // each thread its own copies
  }
};

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline int lane_id() {
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(linear % 32);
}

}  // namespace emu

// ------------------------------------------------------------------------------------------
// synchronisation

void __syncthreads();

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int lane = emu::lane_id();
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;  // outside its segment: own
  return emu::from_bits<T>(emu::shuffle(mask, emu::to_bits(var), src, "__shfl_xor_sync"));
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int lane = emu::lane_id();
  const int in_segment = lane % width + static_cast<int>(delta);
  const int src = in_segment < width ? lane + static_cast<int>(delta) : lane;
  return emu::from_bits<T>(emu::shuffle(mask, emu::to_bits(var), src, "__shfl_down_sync"));
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const int lane = emu::lane_id();
  const int src = (lane & ~(width - 1)) + (src_lane % width);
  return emu::from_bits<T>(emu::shuffle(mask, emu::to_bits(var), src, "__shfl_sync"));
}
