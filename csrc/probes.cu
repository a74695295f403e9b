// Probes of the tensor-core instructions the attention kernels rely on: what mma.sync and
// ldmatrix hand each lane. The tests compare them with the PTX ISA's layouts, written out again
// in Python: in the CPU emulator (tests/test_kernel_emulator.py), against its model of the
// instructions, and on a GPU (tests/test_kernels.py, gpu tier), against the hardware, which so
// checks the emulator's model too. Launchers in kernels.h; bindings probe_mma / probe_ldmatrix.

#include "mma.cuh"

namespace mllm {
namespace {

// out (16 x 8) = A (16 x 16) times B (16 x 8) through one mma.sync, in = A then B row-major in
// fp32 (rounded to T); each lane loads its fragments by the layouts of mma.cuh.
template <typename T>
__global__ void probe_mma_kernel(const float* __restrict__ in, float* __restrict__ out) {
  const float* a = in;
  const float* b = in + 16 * 16;
  const int g = threadIdx.x / 4;
  const int t = threadIdx.x % 4;
  const uint32_t af[4] = {pack<T>(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                          pack<T>(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                          pack<T>(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                          pack<T>(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t bf[2] = {pack<T>(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                          pack<T>(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  mma_16816<T>(d, af, bf);
  for (int i = 0; i < 4; ++i) out[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d[i];
}

// The fragments ldmatrix gives each lane, plain then transposed, of the 16x16 matrix `in` (fp32,
// stored as fp16): matrix i of the four starts at row 8 * (i % 2), column 8 * (i / 2).
// out[((trans * 32 + lane) * 4 + i) * 2 + half].
__global__ void probe_ldmatrix_kernel(const float* __restrict__ in, float* __restrict__ out) {
  __shared__ __align__(16) __half tile[16][16 + 8];
  for (int e = threadIdx.x; e < 256; e += 32) tile[e / 16][e % 16] = __float2half_rn(in[e]);
  __syncthreads();
  const int lane = threadIdx.x;
  const int matrix = lane / 8;
  const __half* row = &tile[8 * (matrix % 2) + lane % 8][8 * (matrix / 2)];
  uint32_t r[2][4];
  ldmatrix_x4<false>(r[0], row);
  ldmatrix_x4<true>(r[1], row);
  for (int trans = 0; trans < 2; ++trans) {
    for (int i = 0; i < 4; ++i) {
      for (int half = 0; half < 2; ++half) {
        const uint16_t bits = static_cast<uint16_t>(r[trans][i] >> (16 * half));
        __half h;
        memcpy(&h, &bits, sizeof h);
        out[((trans * 32 + lane) * 4 + i) * 2 + half] = __half2float(h);
      }
    }
  }
}

}  // namespace

void probe_mma(const float* in, float* out, DType dtype, cudaStream_t stream) {
  HOST_CHECK(in && out, "probe_mma: null pointer");
  HOST_CHECK(dtype == DType::kFloat16 || dtype == DType::kBFloat16,
             "probe_mma: fp16 or bf16 operands");
  if (dtype == DType::kFloat16) {
    probe_mma_kernel<__half><<<1, 32, 0, stream>>>(in, out);
  } else {
    probe_mma_kernel<__nv_bfloat16><<<1, 32, 0, stream>>>(in, out);
  }
  CUDA_CHECK(cudaGetLastError());
}

void probe_ldmatrix(const float* in, float* out, cudaStream_t stream) {
  HOST_CHECK(in && out, "probe_ldmatrix: null pointer");
  probe_ldmatrix_kernel<<<1, 32, 0, stream>>>(in, out);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace mllm
