// C entry points for the tests: each runs one kernel of ../kernels.cu on the CPU through
// cuda_shim.h with the grid, block and shared memory the Python side chose. Loaded with ctypes.
#include "cuda_shim.h"
#include "../kernels.cu"

// Forward kernels take (xT, weight, indices, bias, yT), gradient kernels (grad_yT, weight or xT,
// indices, out); the tiled ones also take D.
#define EXPORT_FORWARD(kernel, suffix, T, ...)                                                 \
  extern "C" void kernel##_##suffix(unsigned grid, unsigned block, unsigned shared, const T* xT, \
                                    const T* w, const int* idx, const T* bias, T* yT, int L,    \
                                    int k, int B __VA_OPT__(, int D)) {                         \
    launch(kernel<T>, grid, block, shared, xT, w, idx, bias, yT, L, k, B __VA_OPT__(, D));      \
  }
#define EXPORT_GRAD(kernel, suffix, T, Out, ...)                                               \
  extern "C" void kernel##_##suffix(unsigned grid, unsigned block, unsigned shared, const T* g, \
                                    const T* a, const int* idx, Out* out, int L, int k, int B   \
                                    __VA_OPT__(, int D)) {                                      \
    launch(kernel<T>, grid, block, shared, g, a, idx, out, L, k, B __VA_OPT__(, D));            \
  }
#define EXPORT_KERNELS(T, suffix)                                                               \
  EXPORT_FORWARD(fixed_fanin_forward, suffix, T)                                                \
  EXPORT_GRAD(fixed_fanin_grad_input, suffix, T, float)                                         \
  EXPORT_GRAD(fixed_fanin_grad_weight, suffix, T, T)                                            \
  EXPORT_FORWARD(fixed_fanin_forward_tiled, suffix, T, tiled)                                   \
  EXPORT_GRAD(fixed_fanin_grad_weight_tiled, suffix, T, float, tiled)

#define EXPORT_GATHER(T, suffix)                                                                \
  extern "C" void fixed_fanin_grad_input_gather_##suffix(                                      \
      unsigned grid, unsigned block, unsigned shared, const T* g, const T* w, const int* idx,   \
      const int* order, const int* starts, float* partial, int L, int k, int B, int D,          \
      int features_per_warp, int groups) {                                                      \
    launch(fixed_fanin_grad_input_gather<T>, grid, block, shared, g, w, idx, order, starts,     \
           partial, L, k, B, D, features_per_warp, groups);                                     \
  }

EXPORT_GATHER(float, float32)
EXPORT_GATHER(half16, float16)
EXPORT_GATHER(bfloat16, bfloat16)
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
