// CUDA kernels of the fixed fan-in sparse layer (paper, Section 3: "fixed fan-in sparse layer").
//
// Label l reads k inputs:  y[b, l] = sum_j weight[l, j] * x[b, indices[l, j]].
// The three kernels below are its forward pass and its two gradients. sparse_layer.py compiles
// this file at run time with cupy.RawModule (NVRTC) and launches it on PyTorch's current stream;
// tests/cuda_shim.h compiles the very same source with g++ so that CI, which has no GPU, runs it.
//
// Layout. Activations arrive transposed, xT[D, B] (row d holds feature d of every sample), and
// outputs leave as yT[L, B]. Consecutive threads take consecutive samples b of the same label, so
// the gather xT[indices[l, j], b] reads one contiguous row segment per warp (coalesced), and the
// weight/index of (l, j) is the same address for the whole warp (one broadcast load).
//
// Precision. T is the storage type (float, half16 or bfloat16); every sum is accumulated in float.
// The 16-bit types are plain structs with hand-written conversions, so this file needs no CUDA
// header: NVRTC, nvcc and g++ all compile it as it is.
//
// Sizes. B * L exceeds 2^31 at Amazon-3M, so every flat offset is 64-bit (long long). A 1-D grid
// with a grid-stride loop puts all work on grid.x (grid.y/z stop at 65,535).
//
// This is the first, correct-first kernel set; how fast each one is, and why, is measured by
// bench.py (see README).

struct half16 { unsigned short bits; };    // IEEE binary16, stored as raw bits
struct bfloat16 { unsigned short bits; };  // bfloat16: the top 16 bits of a float

__device__ inline float to_float(float v) { return v; }

__device__ inline float to_float(bfloat16 v) { return __uint_as_float((unsigned int)v.bits << 16); }

__device__ inline float to_float(half16 v) {
  unsigned int sign = (unsigned int)(v.bits & 0x8000u) << 16;
  unsigned int exponent = (v.bits >> 10) & 0x1fu;
  unsigned int mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    float magnitude = (float)mantissa * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15 -> 127
}

template <typename T> __device__ inline T from_float(float v);

template <> __device__ inline float from_float<float>(float v) { return v; }

template <> __device__ inline bfloat16 from_float<bfloat16>(float v) {
  unsigned int u = __float_as_uint(v);
  bfloat16 out;
  if ((u & 0x7fffffffu) > 0x7f800000u) { out.bits = 0x7fc0u; return out; }  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  out.bits = (unsigned short)(u >> 16);
  return out;
}

template <> __device__ inline half16 from_float<half16>(float v) {
  unsigned int u = __float_as_uint(v);
  unsigned int sign = u & 0x80000000u;
  u ^= sign;
  unsigned int h;
  if (u >= 0x47800000u) {  // |v| >= 65536 (or inf/NaN): beyond half's range
    h = (u > 0x7f800000u) ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {  // |v| < 2^-14: half subnormal; adding 0.5f lets the FPU round
    h = __float_as_uint(__uint_as_float(u) + 0.5f) - 0x3f000000u;
  } else {  // normal: rebias the exponent, then round the 13 dropped bits to nearest even
    unsigned int mantissa_odd = (u >> 13) & 1u;
    u += 0xc8000fffu + mantissa_odd;  // (15 - 127) << 23, plus 0xfff: modulo 2^32
    h = u >> 13;
  }
  half16 out;
  out.bits = (unsigned short)(h | (sign >> 16));
  return out;
}

// yT[l, b] = sum_j weight[l, j] * xT[indices[l, j], b]. One thread per output (l, b).
template <typename T>
__global__ void fixed_fanin_forward(const T* xT, const T* weight, const int* indices, T* yT,
                                    int num_labels, int fan_in, int batch) {
  long long total = (long long)num_labels * batch;
  long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    long long label = i / batch;
    long long b = i - label * batch;
    const T* w = weight + label * fan_in;
    const int* idx = indices + label * fan_in;
    float acc = 0.0f;
    for (int j = 0; j < fan_in; ++j) acc += to_float(w[j]) * to_float(xT[(long long)idx[j] * batch + b]);
    yT[i] = from_float<T>(acc);
  }
}

// grad_xT[d, b] = sum over (l, j) with indices[l, j] == d of grad_yT[l, b] * weight[l, j].
// This is a scatter: many labels feed the same input feature, so threads collide on grad_xT.
// Correct first: one thread per (l, b) adds its k contributions with float atomics into a float
// buffer (the caller casts it to T). Two cheap savings: a zero output gradient (squared hinge
// gives many) adds nothing and is skipped, and lanes of a warp hit consecutive b, so their
// atomics land in one row segment instead of colliding on one address.
template <typename T>
__global__ void fixed_fanin_grad_input(const T* grad_yT, const T* weight, const int* indices,
                                       float* grad_xT, int num_labels, int fan_in, int batch) {
  long long total = (long long)num_labels * batch;
  long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    float g = to_float(grad_yT[i]);
    if (g == 0.0f) continue;
    long long label = i / batch;
    long long b = i - label * batch;
    const T* w = weight + label * fan_in;
    const int* idx = indices + label * fan_in;
    for (int j = 0; j < fan_in; ++j) atomicAdd(&grad_xT[(long long)idx[j] * batch + b], g * to_float(w[j]));
  }
}

// grad_weight[l, j] = sum_b grad_yT[l, b] * xT[indices[l, j], b]. One thread per (l, j), a dot
// product of two rows of length B; no two threads write the same output, so no atomics.
template <typename T>
__global__ void fixed_fanin_grad_weight(const T* grad_yT, const T* xT, const int* indices,
                                        T* grad_weight, int num_labels, int fan_in, int batch) {
  long long total = (long long)num_labels * fan_in;
  long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    long long label = i / fan_in;
    const T* g = grad_yT + label * batch;
    const T* x = xT + (long long)indices[i] * batch;
    float acc = 0.0f;
    for (int b = 0; b < batch; ++b) acc += to_float(g[b]) * to_float(x[b]);
    grad_weight[i] = from_float<T>(acc);
  }
}
