// Kernels with deliberate faults, for the emulator's own tests (tests/test_kernel_emulator.py):
// each must be caught, or the emulator's passing verdict on csrc/ would mean nothing. Valid
// CUDA (csrc/check_compile.sh compiles it too); never built into the extension. (The probes of
// mma.sync and ldmatrix, which are not faults, are in csrc/probes.cu.)

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../mma.cuh"

namespace {

constexpr int kThreads = 64;

// out = in reversed within each block, through shared memory. Without `sync` the read of a
// neighbour's slot does not wait for its write: a race.
__global__ void reverse_kernel(const float* in, float* out, bool sync) {
  __shared__ float tile[kThreads];
  const int at = blockIdx.x * kThreads + threadIdx.x;
  tile[threadIdx.x] = in[at];
  if (sync) __syncthreads();
  out[at] = tile[kThreads - 1 - threadIdx.x];
}

// Adds the neighbouring lane's value, but only in even lanes: a full-mask shuffle that the odd
// lanes never join.
__global__ void divergent_shuffle_kernel(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x % 2 == 0) v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// The first warp waits at one barrier, the second at another.
__global__ void divergent_barrier_kernel(const float* in, float* out) {
  __shared__ float tile[kThreads];
  tile[threadIdx.x] = in[threadIdx.x];
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x ^ 32];
  } else {
    __syncthreads();
    out[threadIdx.x] = tile[threadIdx.x ^ 32] * 2.0f;
  }
}

// Threads past n return, and the rest then wait at a barrier.
__global__ void barrier_after_return_kernel(const float* in, float* out, int n) {
  __shared__ float tile[kThreads];
  if (static_cast<int>(threadIdx.x) >= n) return;
  tile[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[n - 1 - threadIdx.x];
}

// Writes one element past the end of out.
__global__ void write_past_end_kernel(const float* in, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = i < n ? in[i] : 0.0f;
}

__device__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// A block sum through a shared scratch array; `reuse_guard` is the barrier that keeps a warp
// from writing the scratch of this sum while another still reads the previous sum's.
__device__ float block_sum(float v, float* scratch, bool reuse_guard) {
  v = warp_sum(v);
  if (reuse_guard) __syncthreads();
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  return warp_sum(threadIdx.x % 32 < blockDim.x / 32 ? scratch[threadIdx.x % 32] : 0.0f);
}

// out = sum(in) + sum(in * in) over a block of 128, two block sums through one scratch.
__global__ void two_sums_kernel(const float* in, float* out, bool reuse_guard) {
  __shared__ float scratch[32];
  const float v = in[threadIdx.x];
  const float a = block_sum(v, scratch, reuse_guard);
  const float b = block_sum(v * v, scratch, reuse_guard);
  out[threadIdx.x] = a + b;
}

// A tensor-core op, which needs the whole warp, in a block of 16 threads.
__global__ void partial_warp_mma_kernel(float* out) {
  const uint32_t a[4] = {0, 0, 0, 0};
  const uint32_t b[2] = {0, 0};
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  mllm::mma_16816<__half>(d, a, b);
  out[threadIdx.x] = d[0];
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorString(err));
}

}  // namespace

// Runs the faulty kernel `name` over in (n floats) into out; `n` is a multiple of 64 except
// for write_past_end. Throws what the launch (or the emulator) reports.
void run_fault_kernel(const std::string& name, const float* in, float* out, int n) {
  if (name == "race" || name == "no_race") {
    reverse_kernel<<<n / kThreads, kThreads>>>(in, out, name == "no_race");
  } else if (name == "two_sums" || name == "two_sums_racy") {
    two_sums_kernel<<<1, 128>>>(in, out, name == "two_sums");
  } else if (name == "divergent_shuffle") {
    divergent_shuffle_kernel<<<1, 32>>>(in, out);
  } else if (name == "divergent_barrier") {
    divergent_barrier_kernel<<<1, kThreads>>>(in, out);
  } else if (name == "barrier_after_return") {
    barrier_after_return_kernel<<<1, kThreads>>>(in, out, n);
  } else if (name == "write_past_end") {
    write_past_end_kernel<<<(n + kThreads) / kThreads, kThreads>>>(in, out, n);
  } else if (name == "partial_warp_mma") {
    partial_warp_mma_kernel<<<1, 16>>>(out);
  } else if (name == "too_many_threads") {
    reverse_kernel<<<1, 2048>>>(in, out, true);
  } else {
    throw std::invalid_argument("no fault kernel " + name);
  }
  check_launch();
}
