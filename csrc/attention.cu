// Causal attention, flash-attention style: queries and keys are tiled, the softmax is computed
// online (running max and sum per query), and no seq x seq matrix is ever stored. Forward saves
// only the output and each query's log-sum-exp; backward recomputes the probabilities from it.
//
// forward   one block per (batch * head, 64 queries); 4 threads per query, each owning
//           head_dim / 4 of its dimensions; keys and values stream through shared memory 32 at
//           a time, and only up to the block's last query (causal).
// backward  delta = rowsum(dout * out); then two passes, each owning what it writes, so no
//           atomics and a deterministic result: dq per query block (as forward, looping over
//           keys), and dk, dv per key block (8 threads per key, looping over later queries and
//           over every query head of the key's group, which is how grouped-query attention sums
//           its gradient).
//
// Scores are kept in the log2 domain (q scaled by log2(e) / sqrt(head_dim)) so that exp is
// exp2f. Arithmetic is fp32 (CUDA cores, no tensor cores): a correct first version, not a fast
// one. Reference: megatron_llm/kernels/reference.py causal_attention; parity:
// tests/test_kernels.py; benchmark: bench/kernels.py.

#include <cmath>

#include "common.cuh"

namespace mllm {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

constexpr int kQueryRows = 64;  // queries per forward / dq block
constexpr int kQueryLanes = 4;  // threads per query
constexpr int kQueryThreads = kQueryRows * kQueryLanes;
constexpr int kKeyTile = 32;    // keys per shared-memory tile in forward / dq

constexpr int kKeyRows = 32;    // keys per dk/dv block
constexpr int kKeyLanes = 8;    // threads per key
constexpr int kKeyThreads = kKeyRows * kKeyLanes;
constexpr int kQueryTile = 32;  // queries per shared-memory tile in dk/dv

// ----------------------------------------------------------------------------------------------
// kernels

// Sum over the LANES consecutive threads that share one query (or key) row of a warp.
template <int LANES>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Rows [first, first + ROWS) of a (seq, D) matrix into shared memory as fp32; rows at or past
// seq become zeros.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(float (*tile)[D], const T* __restrict__ src,
                                          int first, int seq) {
  for (int e = threadIdx.x; e < ROWS * D; e += blockDim.x) {
    const int r = e / D;
    const int c = e % D;
    const int row = first + r;
    tile[r][c] = row < seq ? to_float(src[static_cast<int64_t>(row) * D + c]) : 0.0f;
  }
}

// grid: (batch * heads, query blocks), block: kQueryThreads.
template <typename T, int D>
__global__ void __launch_bounds__(kQueryThreads)
    attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, T* __restrict__ o,
                             float* __restrict__ lse, int heads, int kv_heads, int seq,
                             float scale_log2) {
  constexpr int P = D / kQueryLanes;  // dimensions per thread
  __shared__ float k_tile[kKeyTile][D];
  __shared__ float v_tile[kKeyTile][D];

  const int bh = blockIdx.x;  // batch * heads + head
  const int kv_bh = (bh / heads) * kv_heads + (bh % heads) / (heads / kv_heads);
  const int q_block = gridDim.y - 1 - blockIdx.y;  // the longest (last) blocks start first
  const int row = threadIdx.x / kQueryLanes;
  const int lane = threadIdx.x % kQueryLanes;
  const int qi = q_block * kQueryRows + row;
  const bool valid = qi < seq;
  const int64_t q_offset = (static_cast<int64_t>(bh) * seq + qi) * D;
  const T* kh = k + static_cast<int64_t>(kv_bh) * seq * D;
  const T* vh = v + static_cast<int64_t>(kv_bh) * seq * D;

  float qr[P];
  float acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    qr[p] = valid ? to_float(q[q_offset + lane + p * kQueryLanes]) * scale_log2 : 0.0f;
    acc[p] = 0.0f;
  }
  float m = -INFINITY;  // running max of the scores (log2 domain)
  float l = 0.0f;       // running sum of exp2(score - m)

  const int kv_end = min(seq, (q_block + 1) * kQueryRows);  // causal: no later keys
  for (int first = 0; first < kv_end; first += kKeyTile) {
    __syncthreads();  // everyone is done with the previous tile
    load_tile<T, kKeyTile, D>(k_tile, kh, first, seq);
    load_tile<T, kKeyTile, D>(v_tile, vh, first, seq);
    __syncthreads();

    float s[kKeyTile];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeyTile; ++j) {
      float dot = 0.0f;
#pragma unroll
      for (int p = 0; p < P; ++p) dot += qr[p] * k_tile[j][lane + p * kQueryLanes];
      dot = row_sum<kQueryLanes>(dot);  // every lane of the row joins: no divergence here
      s[j] = first + j <= qi ? dot : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    // Key 0 is in the first tile and visible to every query, so m_new is finite from then on
    // and neither exp2f below sees inf - inf.
    const float m_new = fmaxf(m, tile_max);
    const float correction = exp2f(m - m_new);
    l *= correction;
#pragma unroll
    for (int p = 0; p < P; ++p) acc[p] *= correction;
#pragma unroll
    for (int j = 0; j < kKeyTile; ++j) {
      const float prob = exp2f(s[j] - m_new);
      l += prob;
#pragma unroll
      for (int p = 0; p < P; ++p) acc[p] += prob * v_tile[j][lane + p * kQueryLanes];
    }
    m = m_new;
  }

  if (valid) {
    const float inv_l = 1.0f / l;
#pragma unroll
    for (int p = 0; p < P; ++p) o[q_offset + lane + p * kQueryLanes] = from_float<T>(acc[p] * inv_l);
    if (lane == 0) lse[static_cast<int64_t>(bh) * seq + qi] = (m + log2f(l)) * kLn2;
  }
}

// delta[row] = sum over d of dout[row, d] * o[row, d]; one warp per row of (batch*heads*seq, D).
template <typename T, int D>
__global__ void attention_delta_kernel(const T* __restrict__ o, const T* __restrict__ dout,
                                       float* __restrict__ delta, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // the whole warp leaves together
  float sum = 0.0f;
#pragma unroll
  for (int d = lane; d < D; d += 32) sum += to_float(o[row * D + d]) * to_float(dout[row * D + d]);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j with p_ij = exp(s_ij - lse_i) and
// dp_ij = dout_i . v_j. grid and block as forward.
template <typename T, int D>
__global__ void __launch_bounds__(kQueryThreads)
    attention_dq_kernel(const T* __restrict__ q, const T* __restrict__ k,
                        const T* __restrict__ v, const T* __restrict__ dout,
                        const float* __restrict__ lse, const float* __restrict__ delta,
                        T* __restrict__ dq, int heads, int kv_heads, int seq, float scale_log2,
                        float scale) {
  constexpr int P = D / kQueryLanes;
  __shared__ float k_tile[kKeyTile][D];
  __shared__ float v_tile[kKeyTile][D];

  const int bh = blockIdx.x;
  const int kv_bh = (bh / heads) * kv_heads + (bh % heads) / (heads / kv_heads);
  const int q_block = gridDim.y - 1 - blockIdx.y;
  const int row = threadIdx.x / kQueryLanes;
  const int lane = threadIdx.x % kQueryLanes;
  const int qi = q_block * kQueryRows + row;
  const bool valid = qi < seq;
  const int64_t q_offset = (static_cast<int64_t>(bh) * seq + qi) * D;
  const T* kh = k + static_cast<int64_t>(kv_bh) * seq * D;
  const T* vh = v + static_cast<int64_t>(kv_bh) * seq * D;

  float qr[P];
  float dor[P];
  float acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t at = q_offset + lane + p * kQueryLanes;
    qr[p] = valid ? to_float(q[at]) * scale_log2 : 0.0f;
    dor[p] = valid ? to_float(dout[at]) : 0.0f;
    acc[p] = 0.0f;
  }
  const float lse_log2 = valid ? lse[static_cast<int64_t>(bh) * seq + qi] * kLog2e : 0.0f;
  const float delta_i = valid ? delta[static_cast<int64_t>(bh) * seq + qi] : 0.0f;

  const int kv_end = min(seq, (q_block + 1) * kQueryRows);
  for (int first = 0; first < kv_end; first += kKeyTile) {
    __syncthreads();
    load_tile<T, kKeyTile, D>(k_tile, kh, first, seq);
    load_tile<T, kKeyTile, D>(v_tile, vh, first, seq);
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kKeyTile; ++j) {
      float s = 0.0f;
      float dp = 0.0f;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        s += qr[p] * k_tile[j][lane + p * kQueryLanes];
        dp += dor[p] * v_tile[j][lane + p * kQueryLanes];
      }
      s = row_sum<kQueryLanes>(s);
      dp = row_sum<kQueryLanes>(dp);
      const float prob = valid && first + j <= qi ? exp2f(s - lse_log2) : 0.0f;
      const float ds = prob * (dp - delta_i);
#pragma unroll
      for (int p = 0; p < P; ++p) acc[p] += ds * k_tile[j][lane + p * kQueryLanes];
    }
  }

  if (valid) {
#pragma unroll
    for (int p = 0; p < P; ++p) dq[q_offset + lane + p * kQueryLanes] = from_float<T>(acc[p] * scale);
  }
}

// dv_j = sum_i p_ij dout_i and dk_j = scale * sum_i p_ij (dp_ij - delta_i) q_i, the sums over
// the queries i >= j of every query head that reads this key's head.
// grid: (batch * kv_heads, key blocks), block: kKeyThreads.
template <typename T, int D>
__global__ void __launch_bounds__(kKeyThreads)
    attention_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const T* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          T* __restrict__ dk, T* __restrict__ dv, int heads, int kv_heads,
                          int seq, float scale_log2, float scale) {
  constexpr int P = D / kKeyLanes;
  __shared__ float q_tile[kQueryTile][D];
  __shared__ float do_tile[kQueryTile][D];
  __shared__ float lse_tile[kQueryTile];
  __shared__ float delta_tile[kQueryTile];

  const int kv_bh = blockIdx.x;  // batch * kv_heads + kv head
  const int batch = kv_bh / kv_heads;
  const int group = heads / kv_heads;
  const int first_head = (kv_bh % kv_heads) * group;
  const int k_block = blockIdx.y;  // the first blocks see the most queries and start first
  const int row = threadIdx.x / kKeyLanes;
  const int lane = threadIdx.x % kKeyLanes;
  const int kj = k_block * kKeyRows + row;
  const bool valid = kj < seq;
  const int64_t k_offset = (static_cast<int64_t>(kv_bh) * seq + kj) * D;

  float kr[P];
  float vr[P];
  float dk_acc[P];
  float dv_acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    const int64_t at = k_offset + lane + p * kKeyLanes;
    kr[p] = valid ? to_float(k[at]) : 0.0f;
    vr[p] = valid ? to_float(v[at]) : 0.0f;
    dk_acc[p] = 0.0f;
    dv_acc[p] = 0.0f;
  }

  // Causal: the first query that sees key kj is query kj.
  const int q_start = (k_block * kKeyRows / kQueryTile) * kQueryTile;
  for (int head = first_head; head < first_head + group; ++head) {
    const int64_t bh = static_cast<int64_t>(batch) * heads + head;
    const T* qh = q + bh * seq * D;
    const T* doh = dout + bh * seq * D;
    for (int first = q_start; first < seq; first += kQueryTile) {
      __syncthreads();
      load_tile<T, kQueryTile, D>(q_tile, qh, first, seq);
      load_tile<T, kQueryTile, D>(do_tile, doh, first, seq);
      for (int i = threadIdx.x; i < kQueryTile; i += blockDim.x) {
        const bool in_seq = first + i < seq;
        lse_tile[i] = in_seq ? lse[bh * seq + first + i] * kLog2e : 0.0f;
        delta_tile[i] = in_seq ? delta[bh * seq + first + i] : 0.0f;
      }
      __syncthreads();
#pragma unroll 4
      for (int i = 0; i < kQueryTile; ++i) {
        float s = 0.0f;
        float dp = 0.0f;
#pragma unroll
        for (int p = 0; p < P; ++p) {
          s += q_tile[i][lane + p * kKeyLanes] * kr[p];
          dp += do_tile[i][lane + p * kKeyLanes] * vr[p];
        }
        s = row_sum<kKeyLanes>(s) * scale_log2;
        dp = row_sum<kKeyLanes>(dp);
        const int qi = first + i;
        const float prob = valid && qi < seq && kj <= qi ? exp2f(s - lse_tile[i]) : 0.0f;
        const float ds = prob * (dp - delta_tile[i]);
#pragma unroll
        for (int p = 0; p < P; ++p) {
          dv_acc[p] += prob * do_tile[i][lane + p * kKeyLanes];
          dk_acc[p] += ds * q_tile[i][lane + p * kKeyLanes];
        }
      }
    }
  }

  if (valid) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t at = k_offset + lane + p * kKeyLanes;
      dk[at] = from_float<T>(dk_acc[p] * scale);
      dv[at] = from_float<T>(dv_acc[p]);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// launchers

void check_attention_shape(int batch, int heads, int kv_heads, int seq, int head_dim,
                           DType dtype) {
  const std::string shape = "batch=" + std::to_string(batch) + " heads=" +
                            std::to_string(heads) + " kv_heads=" + std::to_string(kv_heads) +
                            " seq=" + std::to_string(seq) + " head_dim=" +
                            std::to_string(head_dim);
  HOST_CHECK(batch >= 1 && heads >= 1 && kv_heads >= 1 && seq >= 1,
             "attention: " + shape + ": every size must be >= 1");
  HOST_CHECK(heads % kv_heads == 0, "attention: " + shape + ": heads must be a multiple of " +
                                        "kv_heads (grouped-query attention)");
  HOST_CHECK(head_dim == 64 || head_dim == 128,
             "attention: " + shape + ": head_dim must be 64 or 128");
  HOST_CHECK(static_cast<int64_t>(batch) * heads <= INT32_MAX,
             "attention: " + shape + ": batch * heads must be < 2^31");
  HOST_CHECK(ceil_div(seq, kKeyRows) <= 65535,
             "attention: " + shape + ": seq must be at most " + std::to_string(65535 * kKeyRows));
  HOST_CHECK(dtype == DType::kFloat16 || dtype == DType::kBFloat16,
             "attention: only fp16 and bf16 inputs");
}

// Runs the statements with T the element type and D the head dimension.
#define DISPATCH_ATTENTION(dtype, head_dim, ...)                     \
  do {                                                               \
    if (dtype == DType::kFloat16) {                                  \
      using T = __half;                                              \
      if (head_dim == 64) {                                          \
        constexpr int D = 64;                                        \
        __VA_ARGS__;                                                 \
      } else {                                                       \
        constexpr int D = 128;                                       \
        __VA_ARGS__;                                                 \
      }                                                              \
    } else {                                                         \
      using T = __nv_bfloat16;                                       \
      if (head_dim == 64) {                                          \
        constexpr int D = 64;                                        \
        __VA_ARGS__;                                                 \
      } else {                                                       \
        constexpr int D = 128;                                       \
        __VA_ARGS__;                                                 \
      }                                                              \
    }                                                                \
  } while (0)

}  // namespace

void attention_forward(const void* q, const void* k, const void* v, void* o, float* lse,
                       int batch, int heads, int kv_heads, int seq, int head_dim, DType dtype,
                       cudaStream_t stream) {
  check_attention_shape(batch, heads, kv_heads, seq, head_dim, dtype);
  HOST_CHECK(q && k && v && o && lse, "attention_forward: null pointer");
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(head_dim));
  const dim3 grid(batch * heads, ceil_div(seq, kQueryRows));
  DISPATCH_ATTENTION(dtype, head_dim, {
    attention_forward_kernel<T, D><<<grid, kQueryThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<T*>(o), lse, heads, kv_heads, seq, scale_log2);
  });
  CUDA_CHECK(cudaGetLastError());
}

void attention_backward(const void* q, const void* k, const void* v, const void* o,
                        const void* dout, const float* lse, void* dq, void* dk, void* dv,
                        float* delta, int batch, int heads, int kv_heads, int seq, int head_dim,
                        DType dtype, cudaStream_t stream) {
  check_attention_shape(batch, heads, kv_heads, seq, head_dim, dtype);
  HOST_CHECK(q && k && v && o && dout && lse && dq && dk && dv && delta,
             "attention_backward: null pointer");
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const float scale_log2 = kLog2e * scale;
  const int64_t rows = static_cast<int64_t>(batch) * heads * seq;
  const int warps_per_block = 8;
  HOST_CHECK((rows + warps_per_block - 1) / warps_per_block <= INT32_MAX,
             "attention_backward: batch * heads * seq too large");
  const dim3 q_grid(batch * heads, ceil_div(seq, kQueryRows));
  const dim3 k_grid(batch * kv_heads, ceil_div(seq, kKeyRows));
  DISPATCH_ATTENTION(dtype, head_dim, {
    attention_delta_kernel<T, D><<<ceil_div(rows, warps_per_block), 32 * warps_per_block, 0,
                                   stream>>>(static_cast<const T*>(o),
                                             static_cast<const T*>(dout), delta, rows);
    CUDA_CHECK(cudaGetLastError());
    attention_dq_kernel<T, D><<<q_grid, kQueryThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<const T*>(dout), lse, delta, static_cast<T*>(dq), heads, kv_heads, seq,
        scale_log2, scale);
    CUDA_CHECK(cudaGetLastError());
    attention_dkdv_kernel<T, D><<<k_grid, kKeyThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<const T*>(dout), lse, delta, static_cast<T*>(dk), static_cast<T*>(dv),
        heads, kv_heads, seq, scale_log2, scale);
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace mllm
