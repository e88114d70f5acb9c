// C entry points for the tests: each runs one kernel of ../kernels.cu on the CPU through
// cuda_shim.h with the grid and block the Python side chose. Loaded with ctypes.
#include "cuda_shim.h"
#include "../kernels.cu"

#define EXPORT_KERNELS(T, suffix)                                                              \
  extern "C" void forward_##suffix(unsigned grid, unsigned block, const T* xT, const T* w,     \
                                   const int* idx, T* yT, int L, int k, int B) {               \
    launch(fixed_fanin_forward<T>, grid, block, xT, w, idx, yT, L, k, B);                      \
  }                                                                                            \
  extern "C" void grad_input_##suffix(unsigned grid, unsigned block, const T* gT, const T* w,  \
                                      const int* idx, float* gxT, int L, int k, int B) {       \
    launch(fixed_fanin_grad_input<T>, grid, block, gT, w, idx, gxT, L, k, B);                  \
  }                                                                                            \
  extern "C" void grad_weight_##suffix(unsigned grid, unsigned block, const T* gT,             \
                                       const T* xT, const int* idx, T* gw, int L, int k,       \
                                       int B) {                                                \
    launch(fixed_fanin_grad_weight<T>, grid, block, gT, xT, idx, gw, L, k, B);                 \
  }

EXPORT_KERNELS(float, float32)
EXPORT_KERNELS(half16, float16)
EXPORT_KERNELS(bfloat16, bfloat16)

// The 16-bit conversions on their own, so tests can check them on every bit pattern.
extern "C" void half_to_float(const half16* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = to_float(in[i]);
}
extern "C" void float_to_half(const float* in, half16* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = from_float<half16>(in[i]);
}
extern "C" void bfloat16_to_float(const bfloat16* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = to_float(in[i]);
}
extern "C" void float_to_bfloat16(const float* in, bfloat16* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = from_float<bfloat16>(in[i]);
}
