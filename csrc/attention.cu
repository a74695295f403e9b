// Causal attention, flash-attention-2 style on tensor cores (mma.sync m16n8k16, fp32
// accumulators, sm_80+): queries and keys are tiled, the softmax is computed online (running max
// and sum per query), and no seq x seq matrix is ever stored. Forward saves only the output and
// each query's log-sum-exp; backward recomputes the probabilities from it.
//
// forward   one block of 4 warps per (batch * head, 64 queries), each warp 16 queries whose Q
//           fragments stay in registers; keys and values stream through shared memory 64 at a
//           time, only up to the block's last query (causal). S = Q K^T and O += P V are
//           tensor-core products with their K and V fragments from ldmatrix (transposing for
//           V); P goes from the accumulators of S straight into the A fragments of P V,
//           rounded to the input dtype as flash-attention does.
// backward  delta = rowsum(dout * out); then two passes, each owning what it writes, so no
//           atomics and a deterministic result: dq per query block (as forward: S = Q K^T,
//           dP = dO V^T, dQ += dS K), and dk, dv per block of 64 keys (K and V fragments in
//           registers; queries stream through shared memory 32 at a time, from the first that
//           sees the block: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q), looping
//           over every query head of the key's group, which is how grouped-query attention sums
//           its gradient.
//
// Modes (AttentionMode, csrc/kernels.h): keys may be another block of the sequence (seq_k rows
// at global offset k_offset against queries at q_offset), causal by global position or not at
// all, and packed documents (segment ids per query and key). The plain causal attention is the
// mode {seq, 0, 0, causal}. A query that sees no key keeps a running max of -inf: its
// exponentials are taken against 0 instead, its sum stays 0, and it stores out 0, lse -inf.
//
// Scores are kept in the log2 domain (scaled by log2(e) / sqrt(head_dim)) so that exp is exp2f.
// Fragment layouts: csrc/mma.cuh. Reference: megatron_llm/kernels/reference.py
// causal_attention; parity: tests/test_kernel_emulator.py (CPU) and tests/test_kernels.py
// (GPU); benchmark: bench/kernels.py.

#include <cmath>
#include <utility>

#include "common.cuh"
#include "mma.cuh"

namespace mllm {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockQ = 16 * kWarps;  // queries per forward / dq block, 16 per warp
constexpr int kTileK = 64;            // keys per shared-memory tile in forward / dq
constexpr int kBlockK = 16 * kWarps;  // keys per dk/dv block, 16 per warp
constexpr int kTileQ = 32;            // queries per shared-memory tile in dk/dv
constexpr int kPad = 8;               // elements after each shared-memory row, so that the 8
                                      // rows an ldmatrix reads fall in different banks

// ----------------------------------------------------------------------------------------------
// kernels

// Rows [first, first + ROWS) of a (seq, D) matrix into a shared-memory tile, 16 bytes at a time;
// rows at or past seq become zeros.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_rows(T (*tile)[D + kPad], const T* __restrict__ src,
                                          int first, int seq) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kPerRow = D / kVec;
  for (int e = threadIdx.x; e < ROWS * kPerRow; e += blockDim.x) {
    const int r = e / kPerRow;
    const int c = (e % kPerRow) * kVec;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (first + r < seq) {
      v = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(first + r) * D + c);
    }
    *reinterpret_cast<uint4*>(&tile[r][c]) = v;
  }
}

// The A fragments (one per 16 columns) of rows [row0, row0 + 16) of a (seq, D) matrix in
// global memory; rows at or past seq are zeros.
template <typename T, int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[D / 16][4], const T* __restrict__ src,
                                       int row0, int seq) {
  const int lane = threadIdx.x % 32;
  const int r0 = row0 + lane / 4;
  const int r1 = r0 + 8;
  const T* p0 = src + static_cast<int64_t>(r0) * D + 2 * (lane % 4);
  const T* p1 = src + static_cast<int64_t>(r1) * D + 2 * (lane % 4);
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    a[ks][0] = r0 < seq ? pair(p0 + ks * 16) : 0u;
    a[ks][1] = r1 < seq ? pair(p1 + ks * 16) : 0u;
    a[ks][2] = r0 < seq ? pair(p0 + ks * 16 + 8) : 0u;
    a[ks][3] = r1 < seq ? pair(p1 + ks * 16 + 8) : 0u;
  }
}

// acc (16 x 8N) += A (16 x D, fragments) times the first 8N rows of tile, transposed. The B
// fragments of two n-tiles and 16 columns come from one ldmatrix: matrices (rows 8n, 8n + 8) x
// (columns 16ks, 16ks + 8).
template <typename T, int D, int N>
__device__ __forceinline__ void mma_a_tile_t(float (&acc)[N][4], const uint32_t (&a)[D / 16][4],
                                             const T (*tile)[D + kPad]) {
  static_assert(N % 2 == 0, "an even number of n-tiles");
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8;
  const T* row = &tile[8 * (matrix / 2) + lane % 8][8 * (matrix % 2)];
#pragma unroll
  for (int n = 0; n < N; n += 2) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t b[4];
      ldmatrix_x4<false>(b, row + n * 8 * (D + kPad) + ks * 16);
      const uint32_t b0[2] = {b[0], b[1]};
      const uint32_t b1[2] = {b[2], b[3]};
      mma_16816<T>(acc[n], a[ks], b0);
      mma_16816<T>(acc[n + 1], a[ks], b1);
    }
  }
}

// acc (16 x D) += P (16 x 8N, in the accumulator layout, rounded to T) times the first 8N rows
// of tile. The accumulators of two n-tiles of P are exactly the A fragment of 16 columns; the B
// fragments of 16 rows and two d-tiles come from one transposing ldmatrix: matrices (rows 16j,
// 16j + 8) x (columns 8dt, 8dt + 8).
template <typename T, int D, int N>
__device__ __forceinline__ void mma_p_tile(float (&acc)[D / 8][4], const float (&p)[N][4],
                                           const T (*tile)[D + kPad]) {
  static_assert(N % 2 == 0, "P must have a multiple of 16 columns");
  const int lane = threadIdx.x % 32;
  const int matrix = lane / 8;
  const T* row = &tile[8 * (matrix % 2) + lane % 8][8 * (matrix / 2)];
#pragma unroll
  for (int j = 0; j < N / 2; ++j) {
    const uint32_t a[4] = {pack<T>(p[2 * j][0], p[2 * j][1]), pack<T>(p[2 * j][2], p[2 * j][3]),
                           pack<T>(p[2 * j + 1][0], p[2 * j + 1][1]),
                           pack<T>(p[2 * j + 1][2], p[2 * j + 1][3])};
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
      uint32_t b[4];
      ldmatrix_x4<true>(b, row + 16 * j * (D + kPad) + dt * 8);
      const uint32_t b0[2] = {b[0], b[1]};
      const uint32_t b1[2] = {b[2], b[3]};
      mma_16816<T>(acc[dt], a, b0);
      mma_16816<T>(acc[dt + 1], a, b1);
    }
  }
}

// Whether query row `query` sees key row `key` in sample `batch` (rows past the ends see nothing).
__device__ __forceinline__ bool visible(const AttentionMode& mode, int batch, int seq, int query,
                                        int key) {
  if (query >= seq || key >= mode.seq_k) return false;
  if (mode.causal && mode.k_offset + key > mode.q_offset + query) return false;
  return mode.q_segments == nullptr ||
         mode.q_segments[static_cast<int64_t>(batch) * seq + query] ==
             mode.k_segments[static_cast<int64_t>(batch) * mode.seq_k + key];
}

// The keys [0, end) that queries before row `query_end` may see (causal: none later).
__device__ __forceinline__ int key_end(const AttentionMode& mode, int query_end) {
  if (!mode.causal) return mode.seq_k;
  return max(0, min(mode.seq_k, mode.q_offset + query_end - mode.k_offset));
}

// The first query row that may see key row `key0` (causal: none earlier), down to a multiple
// of `tile`.
__device__ __forceinline__ int query_begin(const AttentionMode& mode, int key0, int tile) {
  if (!mode.causal) return 0;
  return (max(0, mode.k_offset + key0 - mode.q_offset) / tile) * tile;
}

// Max and sum over the 4 lanes that hold one row of an accumulator.
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Rows of an accumulator (16 x D, rows row0 + lane / 4 and + 8) times `factor[0..1]` into
// rows of a (seq, D) matrix; rows at or past seq are skipped.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* __restrict__ dst, const float (&acc)[D / 8][4],
                                           int row0, int seq, const float (&factor)[2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + lane / 4 + 8 * h;
    if (r >= seq) continue;
    T* out = dst + static_cast<int64_t>(r) * D + 2 * (lane % 4);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out + dt * 8) =
          pack<T>(acc[dt][2 * h] * factor[h], acc[dt][2 * h + 1] * factor[h]);
    }
  }
}

// grid: (batch * heads, query blocks), block: kThreads.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, T* __restrict__ o,
                             float* __restrict__ lse, int heads, int kv_heads, int seq,
                             float scale_log2, AttentionMode mode) {
  __shared__ __align__(16) T k_tile[kTileK][D + kPad];
  __shared__ __align__(16) T v_tile[kTileK][D + kPad];

  const int bh = blockIdx.x;  // batch * heads + head
  const int kv_bh = (bh / heads) * kv_heads + (bh % heads) / (heads / kv_heads);
  const int q_block = gridDim.y - 1 - blockIdx.y;  // the longest (last) blocks start first
  const int lane = threadIdx.x % 32;
  const int row0 = q_block * kBlockQ + (threadIdx.x / 32) * 16;  // the warp's first query
  const int rows[2] = {row0 + lane / 4, row0 + lane / 4 + 8};     // this lane's two queries
  const int batch = bh / heads;
  const int64_t head_offset = static_cast<int64_t>(bh) * seq * D;
  const T* kh = k + static_cast<int64_t>(kv_bh) * mode.seq_k * D;
  const T* vh = v + static_cast<int64_t>(kv_bh) * mode.seq_k * D;

  uint32_t qa[D / 16][4];
  load_a<T, D>(qa, q + head_offset, row0, seq);
  float acc[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY};  // running max of the scores (log2 domain)
  float l[2] = {0.0f, 0.0f};            // this lane's part of the running sum of exp2(s - m)

  const int kv_end = key_end(mode, (q_block + 1) * kBlockQ);  // causal: no later keys
  for (int first = 0; first < kv_end; first += kTileK) {
    __syncthreads();  // everyone is done with the previous tile
    load_rows<T, kTileK, D>(k_tile, kh, first, mode.seq_k);
    load_rows<T, kTileK, D>(v_tile, vh, first, mode.seq_k);
    __syncthreads();

    float s[kTileK / 8][4] = {};
    mma_a_tile_t<T, D, kTileK / 8>(s, qa, k_tile);
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kTileK / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = first + n * 8 + 2 * (lane % 4) + i % 2;
        const bool seen = visible(mode, batch, seq, rows[i / 2], key);
        s[n][i] = seen ? s[n][i] * scale_log2 : -INFINITY;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], s[n][i]);
      }
    }
    // A query that has seen no key yet has m = -inf: shift by 0 instead, so that no exp2f
    // below sees inf - inf (its masked scores give exp2f(-inf) = 0).
    float correction[2];
    float shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(m[h], quad_max(tile_max[h]));
      shift[h] = m_new == -INFINITY ? 0.0f : m_new;
      correction[h] = exp2f(m[h] - shift[h]);
      m[h] = m_new;
      l[h] *= correction[h];
    }
#pragma unroll
    for (int n = 0; n < kTileK / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[n][i] = exp2f(s[n][i] - shift[i / 2]);
        l[i / 2] += s[n][i];
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[dt][i] *= correction[i / 2];
    }
    mma_p_tile<T, D, kTileK / 8>(acc, s, v_tile);
  }

  float inv_l[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] = quad_sum(l[h]);
    inv_l[h] = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;  // a query that sees nothing: out 0
  }
  store_rows<T, D>(o + head_offset, acc, row0, seq, inv_l);
  if (lane % 4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (rows[h] < seq) {
        lse[static_cast<int64_t>(bh) * seq + rows[h]] =
            l[h] > 0.0f ? (m[h] + log2f(l[h])) * kLn2 : -INFINITY;
      }
    }
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
__global__ void __launch_bounds__(kThreads)
    attention_dq_kernel(const T* __restrict__ q, const T* __restrict__ k,
                        const T* __restrict__ v, const T* __restrict__ dout,
                        const float* __restrict__ lse, const float* __restrict__ delta,
                        T* __restrict__ dq, int heads, int kv_heads, int seq, float scale_log2,
                        float scale, AttentionMode mode) {
  __shared__ __align__(16) T k_tile[kTileK][D + kPad];
  __shared__ __align__(16) T v_tile[kTileK][D + kPad];

  const int bh = blockIdx.x;
  const int kv_bh = (bh / heads) * kv_heads + (bh % heads) / (heads / kv_heads);
  const int q_block = gridDim.y - 1 - blockIdx.y;
  const int lane = threadIdx.x % 32;
  const int row0 = q_block * kBlockQ + (threadIdx.x / 32) * 16;
  const int rows[2] = {row0 + lane / 4, row0 + lane / 4 + 8};
  const int batch = bh / heads;
  const int64_t head_offset = static_cast<int64_t>(bh) * seq * D;
  const T* kh = k + static_cast<int64_t>(kv_bh) * mode.seq_k * D;
  const T* vh = v + static_cast<int64_t>(kv_bh) * mode.seq_k * D;

  uint32_t qa[D / 16][4];
  uint32_t da[D / 16][4];
  load_a<T, D>(qa, q + head_offset, row0, seq);
  load_a<T, D>(da, dout + head_offset, row0, seq);
  float lse_log2[2];
  float delta_r[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const bool valid = rows[h] < seq;
    lse_log2[h] = valid ? lse[static_cast<int64_t>(bh) * seq + rows[h]] * kLog2e : 0.0f;
    delta_r[h] = valid ? delta[static_cast<int64_t>(bh) * seq + rows[h]] : 0.0f;
  }
  float acc[D / 8][4] = {};

  const int kv_end = key_end(mode, (q_block + 1) * kBlockQ);
  for (int first = 0; first < kv_end; first += kTileK) {
    __syncthreads();
    load_rows<T, kTileK, D>(k_tile, kh, first, mode.seq_k);
    load_rows<T, kTileK, D>(v_tile, vh, first, mode.seq_k);
    __syncthreads();

    float s[kTileK / 8][4] = {};
    float dp[kTileK / 8][4] = {};
    mma_a_tile_t<T, D, kTileK / 8>(s, qa, k_tile);
    mma_a_tile_t<T, D, kTileK / 8>(dp, da, v_tile);
#pragma unroll
    for (int n = 0; n < kTileK / 8; ++n) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = first + n * 8 + 2 * (lane % 4) + i % 2;
        const int h = i / 2;
        const float p = visible(mode, batch, seq, rows[h], key)
                            ? exp2f(s[n][i] * scale_log2 - lse_log2[h])
                            : 0.0f;
        s[n][i] = p * (dp[n][i] - delta_r[h]);  // dS
      }
    }
    mma_p_tile<T, D, kTileK / 8>(acc, s, k_tile);
  }
  const float factor[2] = {scale, scale};
  store_rows<T, D>(dq + head_offset, acc, row0, seq, factor);
}

// dv_j = sum_i p_ij dout_i and dk_j = scale * sum_i p_ij (dp_ij - delta_i) q_i, the sums over
// the queries i >= j of every query head that reads this key's head.
// grid: (batch * kv_heads, key blocks), block: kThreads.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    attention_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const T* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          T* __restrict__ dk, T* __restrict__ dv, int heads, int kv_heads,
                          int seq, float scale_log2, float scale, AttentionMode mode) {
  __shared__ __align__(16) T q_tile[kTileQ][D + kPad];
  __shared__ __align__(16) T do_tile[kTileQ][D + kPad];
  __shared__ float lse_tile[kTileQ];
  __shared__ float delta_tile[kTileQ];

  const int kv_bh = blockIdx.x;  // batch * kv_heads + kv head
  const int batch = kv_bh / kv_heads;
  const int group = heads / kv_heads;
  const int first_head = (kv_bh % kv_heads) * group;
  const int k_block = blockIdx.y;  // the first blocks see the most queries and start first
  const int lane = threadIdx.x % 32;
  const int key0 = k_block * kBlockK + (threadIdx.x / 32) * 16;  // the warp's first key
  const int keys[2] = {key0 + lane / 4, key0 + lane / 4 + 8};
  const int64_t kv_offset = static_cast<int64_t>(kv_bh) * mode.seq_k * D;

  uint32_t ka[D / 16][4];
  uint32_t va[D / 16][4];
  load_a<T, D>(ka, k + kv_offset, key0, mode.seq_k);
  load_a<T, D>(va, v + kv_offset, key0, mode.seq_k);
  float dk_acc[D / 8][4] = {};
  float dv_acc[D / 8][4] = {};

  // Causal: no query before the one at the block's first key's global position sees it.
  const int q_start = query_begin(mode, k_block * kBlockK, kTileQ);
  for (int head = first_head; head < first_head + group; ++head) {
    const int64_t bh = static_cast<int64_t>(batch) * heads + head;
    const T* qh = q + bh * seq * D;
    const T* doh = dout + bh * seq * D;
    for (int first = q_start; first < seq; first += kTileQ) {
      __syncthreads();
      load_rows<T, kTileQ, D>(q_tile, qh, first, seq);
      load_rows<T, kTileQ, D>(do_tile, doh, first, seq);
      for (int i = threadIdx.x; i < kTileQ; i += blockDim.x) {
        const bool in_seq = first + i < seq;
        lse_tile[i] = in_seq ? lse[bh * seq + first + i] * kLog2e : 0.0f;
        delta_tile[i] = in_seq ? delta[bh * seq + first + i] : 0.0f;
      }
      __syncthreads();

      float st[kTileQ / 8][4] = {};   // S^T: keys x queries
      float dpt[kTileQ / 8][4] = {};  // dP^T
      mma_a_tile_t<T, D, kTileQ / 8>(st, ka, q_tile);
      mma_a_tile_t<T, D, kTileQ / 8>(dpt, va, do_tile);
#pragma unroll
      for (int n = 0; n < kTileQ / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int col = n * 8 + 2 * (lane % 4) + i % 2;
          const int query = first + col;
          const float p = visible(mode, batch, seq, query, keys[i / 2])
                              ? exp2f(st[n][i] * scale_log2 - lse_tile[col])
                              : 0.0f;
          st[n][i] = p;
          dpt[n][i] = p * (dpt[n][i] - delta_tile[col]);  // dS^T
        }
      }
      mma_p_tile<T, D, kTileQ / 8>(dv_acc, st, do_tile);
      mma_p_tile<T, D, kTileQ / 8>(dk_acc, dpt, q_tile);
    }
  }

  const float dk_factor[2] = {scale, scale};
  const float dv_factor[2] = {1.0f, 1.0f};
  store_rows<T, D>(dk + kv_offset, dk_acc, key0, mode.seq_k, dk_factor);
  store_rows<T, D>(dv + kv_offset, dv_acc, key0, mode.seq_k, dv_factor);
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
  HOST_CHECK(ceil_div(seq, kBlockK) <= 65535,
             "attention: " + shape + ": seq must be at most " + std::to_string(65535 * kBlockK));
  HOST_CHECK(dtype == DType::kFloat16 || dtype == DType::kBFloat16,
             "attention: only fp16 and bf16 inputs");
  int device = 0;
  int major = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  HOST_CHECK(major >= 8, "attention: needs compute capability 8.0 or newer (tensor-core " +
                             std::string("mma.sync m16n8k16); device ") +
                             std::to_string(device) + " is " + std::to_string(major) + ".x");
}

// The kernels read and write rows 16 bytes at a time.
void check_aligned(const void* p, const char* name) {
  HOST_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0,
             std::string("attention: ") + name + " must be 16-byte aligned");
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

void check_mode(const AttentionMode& mode) {
  HOST_CHECK(mode.seq_k >= 1, "attention: seq_k=" + std::to_string(mode.seq_k) + " must be >= 1");
  HOST_CHECK(ceil_div(mode.seq_k, kBlockK) <= 65535,
             "attention: seq_k must be at most " + std::to_string(65535 * kBlockK));
  HOST_CHECK((mode.q_segments == nullptr) == (mode.k_segments == nullptr),
             "attention: give both q_segments and k_segments, or neither");
}

}  // namespace

void attention_forward_mode(const void* q, const void* k, const void* v, void* o, float* lse,
                            int batch, int heads, int kv_heads, int seq, int head_dim,
                            const AttentionMode& mode, DType dtype, cudaStream_t stream) {
  check_attention_shape(batch, heads, kv_heads, seq, head_dim, dtype);
  check_mode(mode);
  HOST_CHECK(q && k && v && o && lse, "attention_forward: null pointer");
  check_aligned(q, "q");
  check_aligned(k, "k");
  check_aligned(v, "v");
  check_aligned(o, "out");
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(head_dim));
  const dim3 grid(batch * heads, ceil_div(seq, kBlockQ));
  DISPATCH_ATTENTION(dtype, head_dim, {
    attention_forward_kernel<T, D><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<T*>(o), lse, heads, kv_heads, seq, scale_log2, mode);
  });
  CUDA_CHECK(cudaGetLastError());
}

void attention_backward_mode(const void* q, const void* k, const void* v, const void* o,
                             const void* dout, const float* lse, void* dq, void* dk, void* dv,
                             float* delta, int batch, int heads, int kv_heads, int seq,
                             int head_dim, const AttentionMode& mode, DType dtype,
                             cudaStream_t stream) {
  check_attention_shape(batch, heads, kv_heads, seq, head_dim, dtype);
  check_mode(mode);
  HOST_CHECK(q && k && v && o && dout && lse && dq && dk && dv && delta,
             "attention_backward: null pointer");
  for (const auto& [p, name] : {std::pair<const void*, const char*>{q, "q"}, {k, "k"}, {v, "v"},
                                {dout, "dout"}, {dq, "dq"}, {dk, "dk"}, {dv, "dv"}}) {
    check_aligned(p, name);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const float scale_log2 = kLog2e * scale;
  const int64_t rows = static_cast<int64_t>(batch) * heads * seq;
  const int warps_per_block = 8;
  HOST_CHECK((rows + warps_per_block - 1) / warps_per_block <= INT32_MAX,
             "attention_backward: batch * heads * seq too large");
  const dim3 q_grid(batch * heads, ceil_div(seq, kBlockQ));
  const dim3 k_grid(batch * kv_heads, ceil_div(mode.seq_k, kBlockK));
  DISPATCH_ATTENTION(dtype, head_dim, {
    attention_delta_kernel<T, D><<<ceil_div(rows, warps_per_block), 32 * warps_per_block, 0,
                                   stream>>>(static_cast<const T*>(o),
                                             static_cast<const T*>(dout), delta, rows);
    CUDA_CHECK(cudaGetLastError());
    attention_dq_kernel<T, D><<<q_grid, kThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<const T*>(dout), lse, delta, static_cast<T*>(dq), heads, kv_heads, seq,
        scale_log2, scale, mode);
    CUDA_CHECK(cudaGetLastError());
    attention_dkdv_kernel<T, D><<<k_grid, kThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<const T*>(dout), lse, delta, static_cast<T*>(dk), static_cast<T*>(dv),
        heads, kv_heads, seq, scale_log2, scale, mode);
  });
  CUDA_CHECK(cudaGetLastError());
}

// The plain causal attention: one block, its keys the queries' own positions.
void attention_forward(const void* q, const void* k, const void* v, void* o, float* lse,
                       int batch, int heads, int kv_heads, int seq, int head_dim, DType dtype,
                       cudaStream_t stream) {
  const AttentionMode mode{seq, 0, 0, true, nullptr, nullptr};
  attention_forward_mode(q, k, v, o, lse, batch, heads, kv_heads, seq, head_dim, mode, dtype,
                         stream);
}

void attention_backward(const void* q, const void* k, const void* v, const void* o,
                        const void* dout, const float* lse, void* dq, void* dk, void* dv,
                        float* delta, int batch, int heads, int kv_heads, int seq, int head_dim,
                        DType dtype, cudaStream_t stream) {
  const AttentionMode mode{seq, 0, 0, true, nullptr, nullptr};
  attention_backward_mode(q, k, v, o, dout, lse, dq, dk, dv, delta, batch, heads, kv_heads, seq,
                          head_dim, mode, dtype, stream);
}

}  // namespace mllm
