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
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------------------
// qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Shared memory is static storage. tests/kernel_emulator.py rewrites each `__shared__` array
// declaration into a static one followed by emu::shared_region(name, sizeof name), which makes
// the array known to the scheduler; it fills every known array with 0xff bytes (a NaN in every
// float type) before each block, so a read of shared memory no thread of the block wrote shows up
// as NaN, as garbage would on a GPU. (A section attribute would do it without the rewrite, but
// g++ ignores it on the static locals of templates.)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define MLLM_EMULATOR 1  // csrc/mma.cuh takes the emulator's tensor-core op below

// ------------------------------------------------------------------------------------------
// built-in variables and vector types

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct __align__(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

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

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

cudaError_t cudaGetLastError();
cudaError_t cudaGetDevice(int* device);
// The emulated device: compute capability 9.0 with 132 multiprocessors (an H100 SXM).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
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

// Registers a __shared__ array (see above); the first call poisons it.
void shared_region(void* p, size_t bytes);

// A warp-wide operation (mma.sync): every lane of a full warp hands in `bytes` bytes at `mine`
// and receives all 32 lanes' contributions, lane by lane, at `all` (32 * bytes).
void warp_collective(const char* op, const void* mine, size_t bytes, void* all);

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

// ------------------------------------------------------------------------------------------
// tensor cores: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32

namespace emu {

template <typename T>
float half_bits_to_float(uint16_t bits) {
  T h;
  std::memcpy(&h, &bits, sizeof h);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(h);
  } else {
    return __bfloat162float(h);
  }
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: lane l hands in the address of row l % 8 of
// matrix l / 8; r[i] receives matrix i's elements (l / 4, 2 * (l % 4) + {0, 1}), or with
// `trans` (2 * (l % 4) + {0, 1}, l / 4), the lower-numbered one in the low half. The addresses
// must be 16-byte aligned and in shared memory (emu.cpp).
void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans);

// d += A * B for the warp's 16x16 A and 16x8 B, distributed over the lanes as the PTX ISA lays
// out the fragments of mma.m16n8k16 (groupID = lane / 4, t = lane % 4; a register's lower half
// holds the lower-numbered element):
//   A: a_i at row groupID + 8 * ((i / 2) % 2), column 2t + i % 2 + 8 * (i / 4), i = 0..7
//   B: b_i at row (k) 2t + i % 2 + 8 * (i / 2), column (n) groupID, i = 0..3
//   C, D: c_i at row groupID + 8 * (i / 2), column 2t + i % 2, i = 0..3
// Products are summed in fp32, as the tensor cores do (their order of summation differs).
template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Fragments {
    uint32_t a[4];
    uint32_t b[2];
  };
  const Fragments mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  Fragments all[32];
  warp_collective(std::is_same_v<T, __half> ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16", &mine,
                  sizeof mine, all);
  float A[16][16];
  float B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane / 4;
    const int t = lane % 4;
    for (int i = 0; i < 8; ++i) {
      const uint16_t bits = static_cast<uint16_t>(all[lane].a[i / 2] >> (16 * (i % 2)));
      A[group + 8 * ((i / 2) % 2)][2 * t + i % 2 + 8 * (i / 4)] = half_bits_to_float<T>(bits);
    }
    for (int i = 0; i < 4; ++i) {
      const uint16_t bits = static_cast<uint16_t>(all[lane].b[i / 2] >> (16 * (i % 2)));
      B[2 * t + i % 2 + 8 * (i / 2)][group] = half_bits_to_float<T>(bits);
    }
  }
  const int lane = lane_id();
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2);
    const int col = 2 * (lane % 4) + i % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    d[i] += sum;
  }
}

}  // namespace emu
