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
// Two kernel sets. The simple kernels (one thread per output, x gathered from L2) work for any
// size and are the readable definition. The fast path: tiled forward and grad-w kernels, which
// copy a tile of the activations into shared memory first (sparse_layer.py uses them whenever that
// tile fits: D up to about 1,500 in fp32, 3,000 in 16 bit on an H100), and grad-x as a gather over
// the transposed connectivity. kernels_notes.md tells how fast each version was and why.

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

// yT[l, b] = bias[l] + sum_j weight[l, j] * xT[indices[l, j], b]. One thread per output (l, b).
// (The bias is added here, before the one rounding to T, rather than by a second pass over yT.)
template <typename T>
__global__ void fixed_fanin_forward(const T* xT, const T* weight, const int* indices, const T* bias,
                                    T* yT, int num_labels, int fan_in, int batch) {
  long long total = (long long)num_labels * batch;
  long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
    long long label = i / batch;
    long long b = i - label * batch;
    const T* w = weight + label * fan_in;
    const int* idx = indices + label * fan_in;
    float acc = to_float(bias[label]);
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

// =============================================================================================
// Tiled kernels.
//
// Why. The simple kernels read x from L2 for every (label, slot, sample): at Amazon-670K
// (L = 670k, k = 32, B = 128) that is 11 GB of L2 traffic per pass, and on an H100 their forward
// ran 15-38x above the DRAM floor, their backward 37-130x (kernels_notes.md). Here a block first copies a tile of TILE_B samples of
// xT (D x 64 values: 192 KB in fp32 at D = 768) into shared memory, then streams many labels past
// it, so each (label, slot) costs one shared-memory read instead of an L2 read.
//
// Work split. A block walks the batch tiles in turn. For each tile its warps take labels
// grid-stride (warp w of block c: labels c*W + w, then + gridDim.x*W, ...), one label per warp,
// the 32 lanes over the tile's 64 samples. The caller launches as many blocks as are resident on
// the GPU at once, so each block copies each tile once. A warp fetches its label's (index, weight)
// pairs 32 at a time, one coalesced load one chunk ahead, into a per-warp slot buffer in shared
// memory, from which every lane reads them as a broadcast: one load per slot per warp, not one
// per lane.
//
// Dynamic shared memory: [W warps x 32 Slots][the tile]; the caller sizes it (CudaOps.tiled_launch).

// TILE_B (samples per batch tile), GATHER_CHUNK (labels per chunk of the gather) and SLOT_BYTES
// are defined once, in cuda_launch.KERNEL_CONSTANTS, and reach this file as -D options (NVRTC at
// run time, g++ for the CPU shim tests, nvcc in CI): Python sizes shared memory with the same
// numbers the kernels index it with.
#if !defined(TILE_B) || !defined(GATHER_CHUNK) || !defined(SLOT_BYTES)
#error "compile with cuda_launch.compile_options(): -DTILE_B=.. -DGATHER_CHUNK=.. -DSLOT_BYTES=.."
#endif
constexpr int WARP = 32;
constexpr unsigned FULL_MASK = 0xffffffffu;
static_assert(TILE_B == 2 * WARP, "a lane reads two samples of a tile row");

struct Slot { int index; float weight; };
static_assert(sizeof(Slot) == SLOT_BYTES, "Python sizes slot buffers with SLOT_BYTES");

// Two consecutive values, read in one load (8 bytes in fp32, 4 in 16 bit): lane t reading
// samples 2t, 2t+1 of a tile row covers the row in one conflict-free sweep of the banks.
template <typename T> struct alignas(2 * sizeof(T)) Two { T a, b; };

#ifndef CUDA_SHIM  // tests/cuda_shim.h provides its own
extern __shared__ unsigned long long dynamic_shared_memory[];
__device__ inline void* shared_memory() { return dynamic_shared_memory; }
#endif

// Copy samples [b0, b0 + TILE_B) of xT[D, B] into tile[D, TILE_B]; samples past B become zero.
template <typename T>
__device__ inline void stage_tile(T* tile, const T* xT, int in_features, int batch, int b0) {
  for (int e = threadIdx.x; e < in_features * TILE_B; e += blockDim.x) {
    int d = e / TILE_B, c = e % TILE_B;
    tile[e] = b0 + c < batch ? xT[(long long)d * batch + b0 + c] : from_float<T>(0.0f);
  }
}

// Slot j0 + lane of a label, as one lane fetches it from global memory (index 0, weight 0 past
// fan_in or past the last label, so that readers need no bounds check). `weight` may be null
// when only the indices are needed.
template <typename T>
__device__ inline Slot load_slot(const T* weight, const int* indices, long long label, int j0,
                                 int num_labels, int fan_in, int lane) {
  Slot s = {0, 0.0f};
  if (label < num_labels && j0 + lane < fan_in) {
    s.index = indices[label * fan_in + j0 + lane];
    if (weight) s.weight = to_float(weight[label * fan_in + j0 + lane]);
  }
  return s;
}

// Put the warp's 32 fetched slots into its buffer, from where every lane reads all of them.
__device__ inline void publish_slots(Slot* slots, Slot mine, int lane) {
  __syncwarp();  // every lane has finished reading the previous chunk
  slots[lane] = mine;
  __syncwarp();  // the new chunk is visible to the whole warp
}

// The warp's next chunk of slots after (label, j0): the label's next 32 slots, else the first 32
// of the warp's next label. Fetched one chunk ahead, so that its DRAM latency hides behind the
// work on the current chunk: without this, every warp sat idle for a DRAM round trip per label.
template <typename T>
__device__ inline Slot prefetch_next(const T* weight, const int* indices, long long label, int j0,
                                     long long label_stride, int num_labels, int fan_in, int lane) {
  return j0 + WARP < fan_in ? load_slot(weight, indices, label, j0 + WARP, num_labels, fan_in, lane)
                            : load_slot(weight, indices, label + label_stride, 0, num_labels, fan_in, lane);
}

// yT[l, b] = bias[l] + sum_j weight[l, j] * xT[indices[l, j], b], from the tile in shared memory.
template <typename T>
__global__ void __launch_bounds__(1024)
fixed_fanin_forward_tiled(const T* xT, const T* weight, const int* indices, const T* bias, T* yT,
                          int num_labels, int fan_in, int batch, int in_features) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  Slot* slots = (Slot*)shared_memory() + warp * WARP;
  T* tile = (T*)((Slot*)shared_memory() + warps * WARP);
  for (int b0 = 0; b0 < batch; b0 += TILE_B) {
    __syncthreads();  // nobody reads the previous tile any more
    stage_tile(tile, xT, in_features, batch, b0);
    __syncthreads();
    const int b = b0 + 2 * lane;
    const long long first = (long long)blockIdx.x * warps + warp, stride = (long long)gridDim.x * warps;
    Slot next = load_slot(weight, indices, first, 0, num_labels, fan_in, lane);
    for (long long label = first; label < num_labels; label += stride) {
      float acc0 = to_float(bias[label]), acc1 = acc0;
      for (int j0 = 0; j0 < fan_in; j0 += WARP) {
        publish_slots(slots, next, lane);
        next = prefetch_next(weight, indices, label, j0, stride, num_labels, fan_in, lane);
        const int n = fan_in - j0 < WARP ? fan_in - j0 : WARP;
#pragma unroll 8  // eight independent shared-memory reads in flight, not one at a time
        for (int j = 0; j < n; ++j) {
          Two<T> x = *(const Two<T>*)(tile + slots[j].index * TILE_B + 2 * lane);
          acc0 += slots[j].weight * to_float(x.a);
          acc1 += slots[j].weight * to_float(x.b);
        }
      }
      if (b < batch) yT[label * batch + b] = from_float<T>(acc0);
      if (b + 1 < batch) yT[label * batch + b + 1] = from_float<T>(acc1);
    }
  }
}

// Given part[i] (i < 16) in every lane, return in lane t the sum over all 32 lanes of
// part[t % 16]. A butterfly: at each step a lane keeps half of its values, swaps the other half
// with its partner and adds, so 16 sums cost 8 + 4 + 2 + 1 + 1 = 16 shuffles, not 16 x 5 for 16
// separate reductions. (16 values, not 32: with 32, ptxas moved the array to local memory.)
__device__ inline float warp_sums_transposed(float* part, int lane) {
#pragma unroll
  for (int half = 8; half > 0; half >>= 1) {
    const bool upper = lane & half;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float low = part[i], high = part[i + half];
      part[i] = (upper ? high : low) + __shfl_xor_sync(FULL_MASK, upper ? low : high, half);
    }
  }
  return part[0] + __shfl_xor_sync(FULL_MASK, part[0], 16);  // the other 16 lanes' share
}

// grad_weight[l, j] = sum_b grad_yT[l, b] * xT[indices[l, j], b] (float output; the caller casts).
// Every lane multiplies its two samples for 16 slots at a time, then warp_sums_transposed leaves
// each slot's sum over the tile in one lane (slot j0 + t in lane t), which adds it to the output:
// a plain read-modify-write, since the same lane of the same warp owns (l, j) in every tile.
template <typename T>
__global__ void __launch_bounds__(1024)
fixed_fanin_grad_weight_tiled(const T* grad_yT, const T* xT, const int* indices, float* grad_weight,
                              int num_labels, int fan_in, int batch, int in_features) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  Slot* slots = (Slot*)shared_memory() + warp * WARP;
  T* tile = (T*)((Slot*)shared_memory() + warps * WARP);
  for (int b0 = 0; b0 < batch; b0 += TILE_B) {
    __syncthreads();
    stage_tile(tile, xT, in_features, batch, b0);
    __syncthreads();
    const int b = b0 + 2 * lane;
    const long long first = (long long)blockIdx.x * warps + warp, stride = (long long)gridDim.x * warps;
    Slot next = load_slot((const T*)nullptr, indices, first, 0, num_labels, fan_in, lane);
    for (long long label = first; label < num_labels; label += stride) {
      const T* g = grad_yT + label * batch;
      const float g0 = b < batch ? to_float(g[b]) : 0.0f;
      const float g1 = b + 1 < batch ? to_float(g[b + 1]) : 0.0f;
      for (int j0 = 0; j0 < fan_in; j0 += WARP) {
        publish_slots(slots, next, lane);
        next = prefetch_next((const T*)nullptr, indices, label, j0, stride, num_labels, fan_in, lane);
        float mine = 0.0f;  // this lane's slot j0 + lane, summed over the tile
        for (int h = 0; h < WARP; h += 16) {
          float part[16];
#pragma unroll
          for (int j = 0; j < 16; ++j) {  // slots past fan_in read row 0; their sums are dropped
            Two<T> x = *(const Two<T>*)(tile + slots[h + j].index * TILE_B + 2 * lane);
            part[j] = g0 * to_float(x.a) + g1 * to_float(x.b);
          }
          const float sum = warp_sums_transposed(part, lane);  // slot h + lane % 16
          if ((lane & 16) == h) mine = sum;
        }
        if (j0 + lane < fan_in) {
          float* out = grad_weight + label * fan_in + j0 + lane;
          *out = (b0 == 0 ? 0.0f : *out) + mine;
        }
      }
    }
  }
}

// =============================================================================================
// grad-x as a gather (v5): no atomics, deterministic.
//
// Why. A scatter, as the simple grad-x does it, costs an atomic per (label, slot, sample); v4 made
// them shared-memory atomics into a tile of grad_xT, and still spent 1.84 ms at the reference shape
// on them (kernels_notes.md; v5 is faster at every size measured, so v4 is gone). Read the
// other way round, grad_xT[d, b] = sum over the (l, j) that read feature d of weight[l, j] *
// grad_yT[l, b] is a gather, like the forward pass, if we know for every feature which (l, j)
// read it: the transposed connectivity, which sparse_layer.transpose_connectivity builds with one
// stable sort whenever the indices change (a rewire, a load) and never per step:
//   order[e]               flat slot positions l * k + j, sorted by (l / GATHER_CHUNK, indices[l, j]);
//   starts[c * D + d]      the first e of chunk c's slots that read feature d; starts[chunks * D] = L * k.
//
// Work split. Labels come in chunks of GATHER_CHUNK. A block stages one chunk of grad_yT (its
// GATHER_CHUNK rows, one batch tile of TILE_B samples) in shared memory; each warp owns a run of
// consecutive input features, so its slots in this chunk are ONE contiguous run of `order`, which
// it streams 32 slots at a time (fetched one piece ahead, as in the tiled kernels). Lanes hold two
// samples each; the sum for the current feature lives in two registers and is added to the
// block's float accumulator tile in shared memory when the feature changes: a plain
// read-modify-write, because no other warp owns that feature. The grid is (groups x feature parts
// x batch tiles); a block walks every groups-th chunk and at the end writes its accumulators to
// partial[group, d, b] without atomics; sparse_layer.py sums the groups (a fixed order, so two
// runs give the same bits).
//
// Dynamic shared memory: [W warps x 32 Slots][chunk: GATHER_CHUNK x TILE_B of T]
//                        [accumulators: W * features_per_warp x TILE_B floats].

// GATHER_CHUNK labels per chunk (256: 64 KB of grad_yT in fp32 at TILE_B = 64)

// The warp's slot piece that starts at entry e of `order` (index = feature offset << 16 | local
// label, as the loop below unpacks it); weight 0 and index of feature 0 past `end`.
template <typename T>
__device__ inline Slot load_transposed_slot(const T* weight, const int* indices, const int* order, int e,
                                            int end, long long first_label, int first_feature,
                                            int fan_in, int lane) {
  Slot s = {0, 0.0f};
  if (e + lane < end) {
    const int position = order[e + lane];
    s.index = ((indices[position] - first_feature) << 16) | (int)(position / fan_in - first_label);
    s.weight = to_float(weight[position]);
  }
  return s;
}

template <typename T>
__global__ void __launch_bounds__(1024, 1)
fixed_fanin_grad_input_gather(const T* grad_yT, const T* weight, const int* indices, const int* order,
                              const int* starts, float* partial, int num_labels, int fan_in, int batch,
                              int in_features, int features_per_warp, int groups) {
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  Slot* slots = (Slot*)shared_memory() + warp * WARP;
  T* chunk_grad = (T*)((Slot*)shared_memory() + warps * WARP);
  float* sums = (float*)(chunk_grad + GATHER_CHUNK * TILE_B);
  // This block: group g of the chunks, feature part p, batch tile t.
  const int features_per_block = warps * features_per_warp;
  const int parts = (in_features + features_per_block - 1) / features_per_block;
  const int g = blockIdx.x % groups, p = blockIdx.x / groups % parts, b0 = blockIdx.x / groups / parts * TILE_B;
  const int first_feature = p * features_per_block + warp * features_per_warp;  // this warp's run
  const int last_feature = first_feature + features_per_warp < in_features ? first_feature + features_per_warp
                                                                          : in_features;  // exclusive
  const int num_chunks = (num_labels + GATHER_CHUNK - 1) / GATHER_CHUNK;
  for (int e = threadIdx.x; e < features_per_block * TILE_B; e += blockDim.x) sums[e] = 0.0f;
  float* my_sums = sums + warp * features_per_warp * TILE_B + 2 * lane;
  for (int c = g; c < num_chunks; c += groups) {
    const long long first_label = (long long)c * GATHER_CHUNK;
    __syncthreads();  // everybody is done with the previous chunk
    for (int e = threadIdx.x; e < GATHER_CHUNK * TILE_B; e += blockDim.x) {
      const long long label = first_label + e / TILE_B;
      const int b = b0 + e % TILE_B;
      chunk_grad[e] = label < num_labels && b < batch ? grad_yT[label * batch + b] : from_float<T>(0.0f);
    }
    __syncthreads();
    if (first_feature >= last_feature) continue;  // a warp past D (the last part) has no features
    const int begin = starts[(long long)c * in_features + first_feature];
    const int end = starts[(long long)c * in_features + last_feature];
    Slot next = load_transposed_slot(weight, indices, order, begin, end, first_label, first_feature, fan_in, lane);
    int feature = 0;  // offset of the feature whose sum acc0, acc1 hold
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int e0 = begin; e0 < end; e0 += WARP) {
      publish_slots(slots, next, lane);
      next = load_transposed_slot(weight, indices, order, e0 + WARP, end, first_label, first_feature, fan_in, lane);
      const int n = end - e0 < WARP ? end - e0 : WARP;
      // One slot at a time (issuing 8 slots' reads together, v5b, measured the same 1.72 ms: the
      // kernel waits on the global loads at each chunk's start, kernels_notes.md)
#pragma unroll 4
      for (int j = 0; j < n; ++j) {
        const Slot s = slots[j];
        if (s.index >> 16 != feature) {  // the same for the whole warp: the run moved on a feature
          my_sums[feature * TILE_B] += acc0;
          my_sums[feature * TILE_B + 1] += acc1;
          feature = s.index >> 16;
          acc0 = acc1 = 0.0f;
        }
        Two<T> gy = *(const Two<T>*)(chunk_grad + (s.index & 0xffff) * TILE_B + 2 * lane);
        acc0 += s.weight * to_float(gy.a);
        acc1 += s.weight * to_float(gy.b);
      }
    }
    my_sums[feature * TILE_B] += acc0;
    my_sums[feature * TILE_B + 1] += acc1;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < features_per_block * TILE_B; e += blockDim.x) {
    const int d = p * features_per_block + e / TILE_B, b = b0 + e % TILE_B;
    if (d < in_features && b < batch) partial[((long long)g * in_features + d) * batch + b] = sums[e];
  }
}
