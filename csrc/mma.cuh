// Tensor-core matrix multiply-accumulate of one warp, mma.sync m16n8k16 with fp32 accumulators
// (sm_80 and later), and the packing of its fp16 / bf16 operands into 32-bit registers.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// with g = lane / 4 and t = lane % 4; a register holds two elements, the lower-numbered one in
// its low half:
//   A (16 x 16, row-major): a[0] = (g, 2t..2t+1)    a[1] = (g+8, 2t..2t+1)
//                           a[2] = (g, 2t+8..2t+9)  a[3] = (g+8, 2t+8..2t+9)
//   B (16 x 8, k x n):      b[0] = (2t..2t+1, g)    b[1] = (2t+8..2t+9, g)
//   C, D (16 x 8, fp32):    d[0..1] = (g, 2t..2t+1) d[2..3] = (g+8, 2t..2t+1)
// ldmatrix (sm_75+) loads those fragments from shared memory, four 8x8 matrices per call.
// Under the CPU emulator (csrc/emulator/) the ops are emu::mma_m16n8k16 and emu::ldmatrix_x4,
// which follow the same layouts.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.cuh"

namespace mllm {

template <typename T>
__device__ __forceinline__ uint32_t bits16(T x) {
  uint16_t b;
  memcpy(&b, &x, sizeof b);
  return b;
}

// Two floats rounded to T, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  return bits16(from_float<T>(lo)) | (bits16(from_float<T>(hi)) << 16);
}

// p[0] and p[1] (p 4-byte aligned) in one register.
template <typename T>
__device__ __forceinline__ uint32_t pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Four 8x8 matrices of 16-bit elements from shared memory: lane l gives the address of row
// l % 8 of matrix l / 8 (16-byte aligned), and r[i] receives matrix i's fragment: elements
// (l / 4, 2 * (l % 4)) and (l / 4, 2 * (l % 4) + 1), or with TRANS those of the transpose,
// (2 * (l % 4), l / 4) and (2 * (l % 4) + 1, l / 4).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#if defined(MLLM_EMULATOR)
  emu::ldmatrix_x4(r, row_address, TRANS);
#elif defined(__CUDA_ARCH__)
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

// d += A * B.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#if defined(MLLM_EMULATOR)
  emu::mma_m16n8k16<T>(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // no m16n8k16 tensor-core op before sm_80; the launchers refuse such devices
#endif
}

}  // namespace mllm
