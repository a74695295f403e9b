// Torch bindings of the csrc/ launchers: tensor checks, allocation, the current stream. Built
// with the .cu files into one extension, `megatron_llm_kernels`, by setup.py; the autograd
// Functions that call it are in megatron_llm/kernels/fused.py.

// c10/cuda rather than ATen/cuda/CUDAContext.h: the latter pulls in cuBLAS/cuSPARSE headers,
// which a minimal CUDA toolkit (and the CI compile check) may not have.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "kernels.h"

namespace {

mllm::DType dtype_tag(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return mllm::DType::kFloat32;
    case at::kHalf:
      return mllm::DType::kFloat16;
    case at::kBFloat16:
      return mllm::DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, ": dtype ", t.scalar_type(), " not supported; use fp32, fp16 or bf16");
  }
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous; call .contiguous() first");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " is ", t.scalar_type(), ", expected ",
              like.scalar_type());
}

// Norm weight and bias go to the kernels as fp32 vectors of the hidden size.
at::Tensor fp32_vector(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(-1), name, " has shape ", t.sizes(),
              ", expected (", x.size(-1), ",)");
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), ", expected ", x.device());
  return t.to(at::kFloat).contiguous();
}

int num_sms(const at::Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return count;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// x: (rows, hidden). Returns y, mean, rstd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    double eps) {
  check_input(x, "x", x);
  TORCH_CHECK(x.dim() == 2, "x must be (rows, hidden), got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = fp32_vector(weight, "weight", x);
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(fp32_vector(*bias, "bias", x)) : std::nullopt;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  mllm::layernorm_forward(x.data_ptr(), w.data_ptr<float>(), b ? b->data_ptr<float>() : nullptr,
                          y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), x.size(0),
                          static_cast<int>(x.size(1)), static_cast<float>(eps), dtype_tag(x, "x"),
                          stream());
  return {y, mean, rstd};
}

// Returns dx and the fp32 gradients of weight and bias (an empty tensor when there is no bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, bool has_bias) {
  check_input(x, "x", x);
  check_input(dy, "dy", x);
  TORCH_CHECK(x.dim() == 2 && dy.sizes() == x.sizes(), "dy ", dy.sizes(), " and x ", x.sizes(),
              " must be the same (rows, hidden)");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = fp32_vector(weight, "weight", x);
  const int64_t rows = x.size(0);
  const int hidden = static_cast<int>(x.size(1));
  const int blocks = mllm::norm_backward_blocks(rows, hidden, num_sms(x));
  at::Tensor workspace = at::empty({2, blocks, hidden}, x.options().dtype(at::kFloat));
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::empty({hidden}, x.options().dtype(at::kFloat));
  at::Tensor dbias = has_bias ? at::empty({hidden}, x.options().dtype(at::kFloat)) : at::Tensor();
  mllm::layernorm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr<float>(), mean.data_ptr<float>(),
                           rstd.data_ptr<float>(), dx.data_ptr(), dweight.data_ptr<float>(),
                           has_bias ? dbias.data_ptr<float>() : nullptr,
                           workspace.data_ptr<float>(), blocks, rows, hidden, dtype_tag(x, "x"),
                           stream());
  return {dx, dweight, dbias};
}

// x: (rows, hidden). Returns y, rstd.
std::tuple<at::Tensor, at::Tensor> rmsnorm_forward(const at::Tensor& x, const at::Tensor& weight,
                                                   double eps) {
  check_input(x, "x", x);
  TORCH_CHECK(x.dim() == 2, "x must be (rows, hidden), got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = fp32_vector(weight, "weight", x);
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  mllm::rmsnorm_forward(x.data_ptr(), w.data_ptr<float>(), y.data_ptr(), rstd.data_ptr<float>(),
                        x.size(0), static_cast<int>(x.size(1)), static_cast<float>(eps),
                        dtype_tag(x, "x"), stream());
  return {y, rstd};
}

// Returns dx and the fp32 gradient of weight.
std::tuple<at::Tensor, at::Tensor> rmsnorm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                    const at::Tensor& weight,
                                                    const at::Tensor& rstd) {
  check_input(x, "x", x);
  check_input(dy, "dy", x);
  TORCH_CHECK(x.dim() == 2 && dy.sizes() == x.sizes(), "dy ", dy.sizes(), " and x ", x.sizes(),
              " must be the same (rows, hidden)");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = fp32_vector(weight, "weight", x);
  const int64_t rows = x.size(0);
  const int hidden = static_cast<int>(x.size(1));
  const int blocks = mllm::norm_backward_blocks(rows, hidden, num_sms(x));
  at::Tensor workspace = at::empty({blocks, hidden}, x.options().dtype(at::kFloat));
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::empty({hidden}, x.options().dtype(at::kFloat));
  mllm::rmsnorm_backward(dy.data_ptr(), x.data_ptr(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                         dx.data_ptr(), dweight.data_ptr<float>(), workspace.data_ptr<float>(),
                         blocks, rows, hidden, dtype_tag(x, "x"),
                         stream());
  return {dx, dweight};
}

void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes(),
              "q must be (batch, heads, seq, head_dim) and k, v (batch, kv_heads, seq, head_dim); "
              "got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "k ", k.sizes(), " does not match q ", q.sizes(), " in batch, seq or head_dim");
}

// q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim). Returns out, lse.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v) {
  check_attention(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  mllm::attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                          lse.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2),
                          q.size(3), dtype_tag(q, "q"), stream());
  return {out, lse};
}

// Returns dq, dk, dv.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse) {
  check_attention(q, k, v);
  check_input(out, "out", q);
  check_input(dout, "dout", q);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "out ", out.sizes(),
              " and dout ", dout.sizes(), " must match q ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.device() == q.device() && lse.numel() == q.numel() / q.size(3),
              "lse must be the fp32 (batch, heads, seq) tensor saved by attention_forward");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  at::Tensor delta = at::empty_like(lse);
  mllm::attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                           dout.data_ptr(), lse.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(),
                           dv.data_ptr(), delta.data_ptr<float>(), q.size(0), q.size(1),
                           k.size(1), q.size(2), q.size(3), dtype_tag(q, "q"),
                           stream());
  return {dq, dk, dv};
}

// One block of a longer attention (AttentionMode in kernels.h): k, v (batch, kv_heads, seq_k,
// head_dim) at global offset k_offset, q at q_offset, causal by global position or not, and
// optional int32 segment ids (batch, seq) / (batch, seq_k) (packed documents).
mllm::AttentionMode attention_mode(const at::Tensor& q, const at::Tensor& k, int64_t q_offset,
                                   int64_t k_offset, bool causal,
                                   const std::optional<at::Tensor>& q_segments,
                                   const std::optional<at::Tensor>& k_segments) {
  TORCH_CHECK(q_segments.has_value() == k_segments.has_value(),
              "give both q_segments and k_segments, or neither");
  TORCH_CHECK(q_offset >= 0 && k_offset >= 0 && q_offset <= INT32_MAX && k_offset <= INT32_MAX,
              "q_offset ", q_offset, " and k_offset ", k_offset, " must be in [0, 2^31)");
  const int32_t* q_ids = nullptr;
  const int32_t* k_ids = nullptr;
  if (q_segments.has_value()) {
    for (const auto& [t, rows, name] :
         {std::tuple<const at::Tensor&, int64_t, const char*>{*q_segments, q.size(2), "q_segments"},
          {*k_segments, k.size(2), "k_segments"}}) {
      TORCH_CHECK(t.is_cuda() && t.device() == q.device() && t.scalar_type() == at::kInt &&
                      t.is_contiguous() && t.dim() == 2 && t.size(0) == q.size(0) &&
                      t.size(1) == rows,
                  name, " must be a contiguous int32 (batch, ", rows, ") tensor on ", q.device(),
                  "; got ", t.scalar_type(), " ", t.sizes());
    }
    q_ids = q_segments->data_ptr<int32_t>();
    k_ids = k_segments->data_ptr<int32_t>();
  }
  return mllm::AttentionMode{static_cast<int>(k.size(2)), static_cast<int>(q_offset),
                             static_cast<int>(k_offset), causal, q_ids, k_ids};
}

void check_block_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
                  k.size(3) == q.size(3),
              "q must be (batch, heads, seq, head_dim) and k, v (batch, kv_heads, seq_k, "
              "head_dim); got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
}

std::tuple<at::Tensor, at::Tensor> attention_forward_mode(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t q_offset,
    int64_t k_offset, bool causal, const std::optional<at::Tensor>& q_segments,
    const std::optional<at::Tensor>& k_segments) {
  check_block_attention(q, k, v);
  const auto mode = attention_mode(q, k, q_offset, k_offset, causal, q_segments, k_segments);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  mllm::attention_forward_mode(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                               lse.data_ptr<float>(), q.size(0), q.size(1), k.size(1), q.size(2),
                               q.size(3), mode, dtype_tag(q, "q"), stream());
  return {out, lse};
}

// out and lse: those of the WHOLE attention this block is part of (ring attention merges them).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_mode(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, int64_t q_offset, int64_t k_offset,
    bool causal, const std::optional<at::Tensor>& q_segments,
    const std::optional<at::Tensor>& k_segments) {
  check_block_attention(q, k, v);
  check_input(out, "out", q);
  check_input(dout, "dout", q);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), "out ", out.sizes(),
              " and dout ", dout.sizes(), " must match q ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.device() == q.device() && lse.numel() == q.numel() / q.size(3),
              "lse must be the fp32 (batch, heads, seq) log-sum-exp of the whole attention");
  const auto mode = attention_mode(q, k, q_offset, k_offset, causal, q_segments, k_segments);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  at::Tensor delta = at::empty_like(lse);
  mllm::attention_backward_mode(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                                dout.data_ptr(), lse.data_ptr<float>(), dq.data_ptr(),
                                dk.data_ptr(), dv.data_ptr(), delta.data_ptr<float>(), q.size(0),
                                q.size(1), k.size(1), q.size(2), q.size(3), mode,
                                dtype_tag(q, "q"), stream());
  return {dq, dk, dv};
}

// probes.cu: in (384 fp32) -> out (128 fp32); `bf16` picks the operand type.
at::Tensor probe_mma(const at::Tensor& in, bool bf16) {
  TORCH_CHECK(in.is_cuda() && in.scalar_type() == at::kFloat && in.is_contiguous() &&
                  in.numel() == 16 * 16 + 16 * 8,
              "probe_mma: in must be a contiguous CUDA fp32 tensor of 384 elements (A then B)");
  const c10::cuda::CUDAGuard guard(in.device());
  at::Tensor out = at::empty({16, 8}, in.options());
  mllm::probe_mma(in.data_ptr<float>(), out.data_ptr<float>(),
                  bf16 ? mllm::DType::kBFloat16 : mllm::DType::kFloat16, stream());
  return out;
}

// probes.cu: in (16x16 fp32) -> out (2, 32, 4, 2): each lane's ldmatrix fragments.
at::Tensor probe_ldmatrix(const at::Tensor& in) {
  TORCH_CHECK(in.is_cuda() && in.scalar_type() == at::kFloat && in.is_contiguous() &&
                  in.numel() == 256,
              "probe_ldmatrix: in must be a contiguous CUDA fp32 tensor of 256 elements");
  const c10::cuda::CUDAGuard guard(in.device());
  at::Tensor out = at::empty({2, 32, 4, 2}, in.options());
  mllm::probe_ldmatrix(in.data_ptr<float>(), out.data_ptr<float>(), stream());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_llm fused CUDA kernels (csrc/); see megatron_llm/kernels/fused.py";
  m.def("layernorm_forward", &layernorm_forward, "x, weight, bias|None, eps -> y, mean, rstd");
  m.def("layernorm_backward", &layernorm_backward,
        "dy, x, weight, mean, rstd, has_bias -> dx, dweight (fp32), dbias (fp32)");
  m.def("rmsnorm_forward", &rmsnorm_forward, "x, weight, eps -> y, rstd");
  m.def("rmsnorm_backward", &rmsnorm_backward, "dy, x, weight, rstd -> dx, dweight (fp32)");
  m.def("attention_forward", &attention_forward, "q, k, v -> out, lse (causal)");
  m.def("attention_backward", &attention_backward, "dout, q, k, v, out, lse -> dq, dk, dv");
  m.def("attention_forward_mode", &attention_forward_mode,
        "q, k, v, q_offset, k_offset, causal, q_segments|None, k_segments|None -> out, lse");
  m.def("attention_backward_mode", &attention_backward_mode,
        "dout, q, k, v, out, lse, q_offset, k_offset, causal, q_segments|None, k_segments|None "
        "-> dq, dk, dv");
  m.def("probe_mma", &probe_mma, "A then B (384 fp32), bf16 -> A B (16x8 fp32) via mma.sync");
  m.def("probe_ldmatrix", &probe_ldmatrix, "16x16 fp32 -> each lane's ldmatrix fragments");
}
