// A C interface to the csrc/ launchers built for the emulator, for ctypes
// (tests/kernel_emulator.py). Each function returns 0, or 1 with the error in mllm_emu_error().

#include <exception>
#include <string>

#include "../kernels.h"
#include "emu.h"

namespace {

std::string error;

template <typename F>
int guarded(F&& call) {
  error.clear();
  try {
    call();
    return 0;
  } catch (const std::exception& e) {
    error = e.what();
  } catch (...) {
    error = "unknown exception";
  }
  return 1;
}

mllm::DType dtype(int tag) { return static_cast<mllm::DType>(tag); }

}  // namespace

extern "C" {

const char* mllm_emu_error() { return error.c_str(); }

void mllm_emu_set_schedule(unsigned order, int warps_apart) {
  emu::set_schedule(order, warps_apart != 0);
}

int mllm_emu_layernorm_forward(const void* x, const float* weight, const float* bias, void* y,
                               float* mean, float* rstd, int64_t rows, int hidden, float eps,
                               int dtype_tag) {
  return guarded([&] {
    mllm::layernorm_forward(x, weight, bias, y, mean, rstd, rows, hidden, eps, dtype(dtype_tag),
                            nullptr);
  });
}

int mllm_emu_layernorm_backward(const void* dy, const void* x, const float* weight,
                                const float* mean, const float* rstd, void* dx, float* dweight,
                                float* dbias, float* workspace, int blocks, int64_t rows,
                                int hidden, int dtype_tag) {
  return guarded([&] {
    mllm::layernorm_backward(dy, x, weight, mean, rstd, dx, dweight, dbias, workspace, blocks,
                             rows, hidden, dtype(dtype_tag), nullptr);
  });
}

int mllm_emu_rmsnorm_forward(const void* x, const float* weight, void* y, float* rstd,
                             int64_t rows, int hidden, float eps, int dtype_tag) {
  return guarded([&] {
    mllm::rmsnorm_forward(x, weight, y, rstd, rows, hidden, eps, dtype(dtype_tag), nullptr);
  });
}

int mllm_emu_rmsnorm_backward(const void* dy, const void* x, const float* weight,
                              const float* rstd, void* dx, float* dweight, float* workspace,
                              int blocks, int64_t rows, int hidden, int dtype_tag) {
  return guarded([&] {
    mllm::rmsnorm_backward(dy, x, weight, rstd, dx, dweight, workspace, blocks, rows, hidden,
                           dtype(dtype_tag), nullptr);
  });
}

int mllm_emu_norm_backward_blocks(int64_t rows, int hidden, int num_sms) {
  return mllm::norm_backward_blocks(rows, hidden, num_sms);
}

int mllm_emu_attention_forward(const void* q, const void* k, const void* v, void* o, float* lse,
                               int batch, int heads, int kv_heads, int seq, int head_dim,
                               int dtype_tag) {
  return guarded([&] {
    mllm::attention_forward(q, k, v, o, lse, batch, heads, kv_heads, seq, head_dim,
                            dtype(dtype_tag), nullptr);
  });
}

int mllm_emu_attention_backward(const void* q, const void* k, const void* v, const void* o,
                                const void* dout, const float* lse, void* dq, void* dk,
                                void* dv, float* delta, int batch, int heads, int kv_heads,
                                int seq, int head_dim, int dtype_tag) {
  return guarded([&] {
    mllm::attention_backward(q, k, v, o, dout, lse, dq, dk, dv, delta, batch, heads, kv_heads,
                             seq, head_dim, dtype(dtype_tag), nullptr);
  });
}

int mllm_emu_attention_forward_mode(const void* q, const void* k, const void* v, void* o,
                                    float* lse, int batch, int heads, int kv_heads, int seq,
                                    int head_dim, int dtype_tag, int seq_k, int q_offset,
                                    int k_offset, int causal, const int32_t* q_segments,
                                    const int32_t* k_segments) {
  return guarded([&] {
    const mllm::AttentionMode mode{seq_k, q_offset, k_offset, causal != 0, q_segments,
                                   k_segments};
    mllm::attention_forward_mode(q, k, v, o, lse, batch, heads, kv_heads, seq, head_dim, mode,
                                 dtype(dtype_tag), nullptr);
  });
}

int mllm_emu_attention_backward_mode(const void* q, const void* k, const void* v, const void* o,
                                     const void* dout, const float* lse, void* dq, void* dk,
                                     void* dv, float* delta, int batch, int heads, int kv_heads,
                                     int seq, int head_dim, int dtype_tag, int seq_k,
                                     int q_offset, int k_offset, int causal,
                                     const int32_t* q_segments, const int32_t* k_segments) {
  return guarded([&] {
    const mllm::AttentionMode mode{seq_k, q_offset, k_offset, causal != 0, q_segments,
                                   k_segments};
    mllm::attention_backward_mode(q, k, v, o, dout, lse, dq, dk, dv, delta, batch, heads,
                                  kv_heads, seq, head_dim, mode, dtype(dtype_tag), nullptr);
  });
}

int mllm_emu_probe_mma(const float* in, float* out, int dtype_tag) {
  return guarded([&] { mllm::probe_mma(in, out, dtype(dtype_tag), nullptr); });
}

int mllm_emu_probe_ldmatrix(const float* in, float* out) {
  return guarded([&] { mllm::probe_ldmatrix(in, out, nullptr); });
}

}  // extern "C"

// faults.cu: the emulator's own tests.
void run_fault_kernel(const std::string& name, const float* in, float* out, int n);

extern "C" int mllm_emu_fault(const char* name, const float* in, float* out, int n) {
  return guarded([&] { run_fault_kernel(name, in, out, n); });
}
