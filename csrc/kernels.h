// Launchers of the csrc/ kernels: raw device pointers, sizes, a dtype tag and a stream. No torch
// here: bindings.cpp does the tensor checks and calls these. Every launcher checks its sizes and
// every CUDA call (CUDA_CHECK in common.cuh), throwing std::runtime_error / std::invalid_argument
// whose message names the file and line.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace mllm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The norm kernels keep a row in registers: one block per row, `norm_threads` threads, each
// holding a power-of-two number of elements (at most 32), so hidden sizes up to 32768.
constexpr int kNormMaxHidden = 32768;

inline int norm_threads(int hidden) {
  // About 8 elements per thread, a power of two between one warp and 1024 threads.
  int threads = 32;
  while (threads < 1024 && threads * 8 < hidden) threads *= 2;
  return threads;
}

// Blocks of a norm backward: each loops over rows and leaves one partial sum of the weight (and
// bias) gradient, so the workspace is 2 * blocks * hidden floats.
inline int norm_backward_blocks(int64_t rows, int hidden, int num_sms) {
  const int per_sm = 2048 / norm_threads(hidden);
  const int64_t blocks = static_cast<int64_t>(num_sms) * (per_sm > 0 ? per_sm : 1);
  return static_cast<int>(rows < blocks ? rows : blocks);
}

// layernorm.cu. x, y, dy, dx: (rows, hidden) contiguous in `dtype`; weight, bias and their
// gradients in fp32 (bias and dbias may be null); mean, rstd: (rows,) fp32, saved by forward.
void layernorm_forward(const void* x, const float* weight, const float* bias, void* y,
                       float* mean, float* rstd, int64_t rows, int hidden, float eps,
                       DType dtype, cudaStream_t stream);
void layernorm_backward(const void* dy, const void* x, const float* weight, const float* mean,
                        const float* rstd, void* dx, float* dweight, float* dbias,
                        float* workspace, int blocks, int64_t rows, int hidden, DType dtype,
                        cudaStream_t stream);

// rmsnorm.cu. As layernorm, without bias and mean.
void rmsnorm_forward(const void* x, const float* weight, void* y, float* rstd, int64_t rows,
                     int hidden, float eps, DType dtype, cudaStream_t stream);
void rmsnorm_backward(const void* dy, const void* x, const float* weight, const float* rstd,
                      void* dx, float* dweight, float* workspace, int blocks, int64_t rows,
                      int hidden, DType dtype, cudaStream_t stream);

// attention.cu. Causal attention with scale 1/sqrt(head_dim). q, o, dout, dq:
// (batch, heads, seq, head_dim); k, v, dk, dv: (batch, kv_heads, seq, head_dim); all contiguous
// fp16 or bf16; head_dim 64 or 128; heads a multiple of kv_heads (query head h reads kv head
// h / (heads / kv_heads)). lse: (batch, heads, seq) fp32, the natural log-sum-exp of each
// query's scaled scores, written by forward and read by backward. delta: a workspace of
// batch * heads * seq floats.
void attention_forward(const void* q, const void* k, const void* v, void* o, float* lse,
                       int batch, int heads, int kv_heads, int seq, int head_dim, DType dtype,
                       cudaStream_t stream);
void attention_backward(const void* q, const void* k, const void* v, const void* o,
                        const void* dout, const float* lse, void* dq, void* dk, void* dv,
                        float* delta, int batch, int heads, int kv_heads, int seq, int head_dim,
                        DType dtype, cudaStream_t stream);

// One block of a longer attention, as ring attention and packed documents need it (the
// reference: megatron_llm/kernels/attention.py block_attention). Queries are the `seq` rows of
// q; keys and values the `seq_k` rows of k, v, dk, dv. Key j is visible to query i when
// (not causal, or k_offset + j <= q_offset + i: the causal mask by global position) and, with
// segment ids, q_segments[b][i] == k_segments[b][j] (packed documents). A query that sees no
// key gets out 0 and lse -inf (no NaN), and no gradient. Backward takes the lse (and out) of
// the WHOLE attention the block is part of, so the blocks' dq add up and dk, dv are this block's.
struct AttentionMode {
  int seq_k;                            // keys per head
  int q_offset;                         // global position of query 0
  int k_offset;                         // global position of key 0
  bool causal;                          // mask keys after the query (by global position)
  const int32_t* q_segments;            // (batch, seq) segment ids, or null
  const int32_t* k_segments;            // (batch, seq_k), null exactly when q_segments is
};
void attention_forward_mode(const void* q, const void* k, const void* v, void* o, float* lse,
                            int batch, int heads, int kv_heads, int seq, int head_dim,
                            const AttentionMode& mode, DType dtype, cudaStream_t stream);
void attention_backward_mode(const void* q, const void* k, const void* v, const void* o,
                             const void* dout, const float* lse, void* dq, void* dk, void* dv,
                             float* delta, int batch, int heads, int kv_heads, int seq,
                             int head_dim, const AttentionMode& mode, DType dtype,
                             cudaStream_t stream);

// probes.cu: one warp's mma.sync m16n8k16 (in: A 16x16 then B 16x8, fp32 row-major, rounded
// to `dtype`; out: the 16x8 fp32 product) and ldmatrix x4 (in: a 16x16 matrix; out: 512 floats,
// each lane's fragments, plain then transposed). For the tests of the fragment layouts.
void probe_mma(const float* in, float* out, DType dtype, cudaStream_t stream);
void probe_ldmatrix(const float* in, float* out, cudaStream_t stream);

}  // namespace mllm
