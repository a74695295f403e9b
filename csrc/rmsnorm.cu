// RMSNorm over the last dimension: y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps),
// statistics in fp32. One block per row, the row held in registers (one read of x in forward,
// one read of x and dy in backward).
// Reference: megatron_llm/kernels/reference.py rms_norm; parity: tests/test_kernels.py;
// benchmark: bench/kernels.py.

#include "norm.cuh"

namespace mllm {
namespace {

// ----------------------------------------------------------------------------------------------
// kernels

template <typename T, int ITEMS>
__global__ void __launch_bounds__(1024)
    rmsnorm_forward_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                           T* __restrict__ y, float* __restrict__ rstd_out, int hidden,
                           float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;

  float v[ITEMS];
  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    v[i] = c < hidden ? to_float(xr[c]) : 0.0f;
    squares += v[i] * v[i];
  }
  const float rstd = rsqrtf(block_sum(squares, scratch) / hidden + eps);

#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < hidden) yr[c] = from_float<T>(v[i] * rstd * weight[c]);
  }
  if (threadIdx.x == 0) rstd_out[row] = rstd;
}

// dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * weight, xhat = x * rstd. As in
// layernorm.cu, a block loops over rows and each thread sums dweight = sum(dy * xhat) for the
// columns it owns, leaving one partial row per block.
template <typename T, int ITEMS>
__global__ void __launch_bounds__(1024)
    rmsnorm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                            const float* __restrict__ weight, const float* __restrict__ rstd,
                            T* __restrict__ dx, float* __restrict__ dweight_partial,
                            int64_t rows, int hidden) {
  // Above 8 items a thread cannot hold x-hat and g of its columns as well as its weight-gradient
  // sums in the 64 registers a 1024-thread block allows: the second pass reads x and dy again
  // (from L1, where the first pass left them) rather than spilling to local memory.
  constexpr bool kKeep = ITEMS <= 8;
  __shared__ float scratch[32];
  float dweight_acc[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) dweight_acc[i] = 0.0f;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    const float rs = rstd[row];
    float xhat[kKeep ? ITEMS : 1];
    float g[kKeep ? ITEMS : 1];
    float sum_g_xhat = 0.0f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      float xh = 0.0f;
      float gi = 0.0f;
      if (c < hidden) {
        const float d = to_float(dyr[c]);
        xh = to_float(xr[c]) * rs;
        gi = d * weight[c];
        dweight_acc[i] += d * xh;
      }
      sum_g_xhat += gi * xh;
      if constexpr (kKeep) {
        xhat[i] = xh;
        g[i] = gi;
      }
    }
    const float mean_g_xhat = block_sum(sum_g_xhat, scratch) / hidden;
    T* dxr = dx + row * hidden;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c >= hidden) continue;
      float xh;
      float gi;
      if constexpr (kKeep) {
        xh = xhat[i];
        gi = g[i];
      } else {
        xh = to_float(xr[c]) * rs;
        gi = to_float(dyr[c]) * weight[c];
      }
      dxr[c] = from_float<T>(rs * (gi - xh * mean_g_xhat));
    }
  }

  const int64_t base = static_cast<int64_t>(blockIdx.x) * hidden;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < hidden) dweight_partial[base + c] = dweight_acc[i];
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// launchers

void rmsnorm_forward(const void* x, const float* weight, void* y, float* rstd, int64_t rows,
                     int hidden, float eps, DType dtype, cudaStream_t stream) {
  check_norm_shape(rows, hidden);
  HOST_CHECK(x && weight && y && rstd, "rmsnorm_forward: null pointer");
  const int threads = norm_threads(hidden);
  const int items = norm_items(hidden, threads);
  DISPATCH_DTYPE(dtype, T, DISPATCH_NORM_ITEMS(items, ITEMS, {
    rmsnorm_forward_kernel<T, ITEMS><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const T*>(x), weight, static_cast<T*>(y), rstd, hidden, eps);
  }));
  CUDA_CHECK(cudaGetLastError());
}

void rmsnorm_backward(const void* dy, const void* x, const float* weight, const float* rstd,
                      void* dx, float* dweight, float* workspace, int blocks, int64_t rows,
                      int hidden, DType dtype, cudaStream_t stream) {
  check_norm_shape(rows, hidden);
  HOST_CHECK(dy && x && weight && rstd && dx && dweight && workspace,
             "rmsnorm_backward: null pointer");
  HOST_CHECK(blocks >= 1 && blocks <= rows,
             "rmsnorm_backward: blocks=" + std::to_string(blocks) + " must be in [1, rows]");
  const int threads = norm_threads(hidden);
  const int items = norm_items(hidden, threads);
  DISPATCH_DTYPE(dtype, T, DISPATCH_NORM_ITEMS(items, ITEMS, {
    rmsnorm_backward_kernel<T, ITEMS><<<blocks, threads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), weight, rstd,
        static_cast<T*>(dx), workspace, rows, hidden);
  }));
  CUDA_CHECK(cudaGetLastError());
  column_sum(workspace, dweight, blocks, hidden, stream);
}

}  // namespace mllm
