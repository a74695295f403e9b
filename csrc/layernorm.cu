// LayerNorm over the last dimension: y = (x - mean) * rstd * weight + bias, statistics in fp32.
// One block per row, the row held in registers (one read of x in forward; one read of x and dy
// in backward), variance from the mean in registers (two passes over registers, not memory).
// Reference: megatron_llm/kernels/reference.py layer_norm; parity: tests/test_kernels.py;
// benchmark: bench/kernels.py.

#include "norm.cuh"

namespace mllm {
namespace {

// ----------------------------------------------------------------------------------------------
// kernels

template <typename T, int ITEMS>
__global__ void __launch_bounds__(1024)
    layernorm_forward_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                             const float* __restrict__ bias, T* __restrict__ y,
                             float* __restrict__ mean_out, float* __restrict__ rstd_out,
                             int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * hidden;
  T* yr = y + row * hidden;

  float v[ITEMS];
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    v[i] = c < hidden ? to_float(xr[c]) : 0.0f;
    sum += v[i];
  }
  const float mean = block_sum(sum, scratch) / hidden;

  float squares = 0.0f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    const float d = v[i] - mean;
    squares += c < hidden ? d * d : 0.0f;
  }
  const float rstd = rsqrtf(block_sum(squares, scratch) / hidden + eps);

#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < hidden) {
      const float b = bias != nullptr ? bias[c] : 0.0f;
      yr[c] = from_float<T>((v[i] - mean) * rstd * weight[c] + b);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight, xhat = (x - mean) *
// rstd. Each block loops over rows; a thread always owns the same columns, so it sums its
// columns' dweight = sum(dy * xhat) and dbias = sum(dy) in registers and writes one partial
// row per block at the end (column_sum adds the blocks' partials).
template <typename T, int ITEMS>
__global__ void __launch_bounds__(1024)
    layernorm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                              const float* __restrict__ weight, const float* __restrict__ mean,
                              const float* __restrict__ rstd, T* __restrict__ dx,
                              float* __restrict__ dweight_partial,
                              float* __restrict__ dbias_partial, int64_t rows, int hidden) {
  // As in rmsnorm.cu: above 8 items the second pass reads x and dy again rather than spill.
  constexpr bool kKeep = ITEMS <= 8;
  __shared__ float scratch[32];
  float dweight_acc[ITEMS];
  float dbias_acc[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) dweight_acc[i] = dbias_acc[i] = 0.0f;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * hidden;
    const T* dyr = dy + row * hidden;
    const float mu = mean[row];
    const float rs = rstd[row];
    float xhat[kKeep ? ITEMS : 1];
    float g[kKeep ? ITEMS : 1];
    float sum_g = 0.0f;
    float sum_g_xhat = 0.0f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      float xh = 0.0f;
      float gi = 0.0f;
      if (c < hidden) {
        const float d = to_float(dyr[c]);
        xh = (to_float(xr[c]) - mu) * rs;
        gi = d * weight[c];
        dweight_acc[i] += d * xh;
        dbias_acc[i] += d;
      }
      sum_g += gi;
      sum_g_xhat += gi * xh;
      if constexpr (kKeep) {
        xhat[i] = xh;
        g[i] = gi;
      }
    }
    const float mean_g = block_sum(sum_g, scratch) / hidden;
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
        xh = (to_float(xr[c]) - mu) * rs;
        gi = to_float(dyr[c]) * weight[c];
      }
      dxr[c] = from_float<T>(rs * (gi - mean_g - xh * mean_g_xhat));
    }
  }

  const int64_t base = static_cast<int64_t>(blockIdx.x) * hidden;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < hidden) {
      dweight_partial[base + c] = dweight_acc[i];
      dbias_partial[base + c] = dbias_acc[i];
    }
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// launchers

void layernorm_forward(const void* x, const float* weight, const float* bias, void* y,
                       float* mean, float* rstd, int64_t rows, int hidden, float eps,
                       DType dtype, cudaStream_t stream) {
  check_norm_shape(rows, hidden);
  HOST_CHECK(x && weight && y && mean && rstd, "layernorm_forward: null pointer");
  const int threads = norm_threads(hidden);
  const int items = norm_items(hidden, threads);
  DISPATCH_DTYPE(dtype, T, DISPATCH_NORM_ITEMS(items, ITEMS, {
    layernorm_forward_kernel<T, ITEMS><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const T*>(x), weight, bias, static_cast<T*>(y), mean, rstd, hidden, eps);
  }));
  CUDA_CHECK(cudaGetLastError());
}

void layernorm_backward(const void* dy, const void* x, const float* weight, const float* mean,
                        const float* rstd, void* dx, float* dweight, float* dbias,
                        float* workspace, int blocks, int64_t rows, int hidden, DType dtype,
                        cudaStream_t stream) {
  check_norm_shape(rows, hidden);
  HOST_CHECK(dy && x && weight && mean && rstd && dx && dweight && workspace,
             "layernorm_backward: null pointer");
  HOST_CHECK(blocks >= 1 && blocks <= rows,
             "layernorm_backward: blocks=" + std::to_string(blocks) + " must be in [1, rows]");
  const int threads = norm_threads(hidden);
  const int items = norm_items(hidden, threads);
  float* dweight_partial = workspace;
  float* dbias_partial = workspace + static_cast<int64_t>(blocks) * hidden;
  DISPATCH_DTYPE(dtype, T, DISPATCH_NORM_ITEMS(items, ITEMS, {
    layernorm_backward_kernel<T, ITEMS><<<blocks, threads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), weight, mean, rstd,
        static_cast<T*>(dx), dweight_partial, dbias_partial, rows, hidden);
  }));
  CUDA_CHECK(cudaGetLastError());
  column_sum(dweight_partial, dweight, blocks, hidden, stream);
  if (dbias != nullptr) column_sum(dbias_partial, dbias, blocks, hidden, stream);
}

}  // namespace mllm
