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
// Kernel sets. The simple kernels (one thread per output, x gathered from L2) work for any size
// and are the readable definition. The fast path (v5): tiled forward and grad-w kernels, which
// copy a tile of the activations into shared memory first (sparse_layer.py uses them whenever that
// tile fits: D up to about 1,500 in fp32, 3,000 in 16 bit on an H100), and grad-x as a gather over
// the transposed connectivity. v6, at the end of the file, computes both gradients in one gather
// pass; it is selectable until a GPU has measured it against v5. kernels_notes.md tells how fast
// each version was and why.

struct half16 { unsigned short bits; };    // IEEE binary16, stored as raw bits
struct bfloat16 { unsigned short bits; };  // bfloat16: the top 16 bits of a float

__device__ inline float to_float(float v) { return v; }

__device__ inline float to_float(bfloat16 v) { return __uint_as_float((unsigned int)v.bits << 16); }

__device__ inline float to_float(half16 v) {
#ifndef CUDA_SHIM  // on a GPU, one conversion instruction (exact, as the code below); the code
  float out;       // below is what the CPU tests check, and it cost the v6 backward kernel spills
  asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(v.bits));
  return out;
#endif
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
// ran 15-38x above the DRAM floor, their backward 37-130x (kernels_notes.md). Here a block first
// copies a tile of TB = 32 * S samples of xT (S samples per lane: D x 64 values, 192 KB in fp32 at
// D = 768, for S = 2) into shared memory, then streams many labels past it, so each (label, slot)
// costs one shared-memory read instead of an L2 read.
//
// Work split. A block walks the batch tiles in turn. For each tile its warps take labels
// grid-stride (warp w of block c: labels c*W + w, then + gridDim.x*W, ...), one label per warp,
// the 32 lanes over the tile's TB samples. The caller launches as many blocks as are resident on
// the GPU at once, so each block copies each tile once. A warp fetches its label's (index, weight)
// pairs 32 at a time, one coalesced load one chunk ahead, into a per-warp slot buffer in shared
// memory, from which every lane reads them as a broadcast: one load per slot per warp, not one
// per lane.
//
// Dynamic shared memory: [W warps x 32 Slots][the tile]; the caller sizes it (CudaOps.tiled_launch).

constexpr int WARP = 32;
constexpr int TILE_B = 64;  // samples per batch tile of the v5 gather: two per lane
constexpr unsigned FULL_MASK = 0xffffffffu;

struct Slot { int index; float weight; };

// S consecutive samples of one row, read in one load: lane t reading samples S*t .. S*t + S - 1
// of a tile row covers the row in one conflict-free sweep of the banks. v5 read S = 2 in every
// dtype (8 bytes in fp32, 4 in 16 bit); v6 reads 8 bytes in every dtype (S = 4 in 16 bit), so a
// 16-bit pass issues half the shared-memory loads per product. (Shared memory serves 128 bytes a
// cycle: per slot a warp's 128 samples then take 2 cycles plus 1 for the slot's broadcast read,
// against 2 x (1 + 1) for two 64-sample tiles: a quarter fewer cycles, not half.)
template <typename T, int S> struct alignas(S * sizeof(T)) Samples { T v[S]; };

#ifndef CUDA_SHIM  // tests/cuda_shim.h provides its own
extern __shared__ unsigned long long dynamic_shared_memory[];
__device__ inline void* shared_memory() { return dynamic_shared_memory; }
#endif

// Copy samples [b0, b0 + TB) of xT[D, B] into tile[D, TB]; samples past B become zero.
template <int TB, typename T>
__device__ inline void stage_tile(T* tile, const T* xT, int in_features, int batch, int b0) {
  for (int e = threadIdx.x; e < in_features * TB; e += blockDim.x) {
    int d = e / TB, c = e % TB;
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
// S samples per lane, a tile of TB = 32 * S samples.
template <typename T, int S>
__global__ void __launch_bounds__(1024)
fixed_fanin_forward_tiled(const T* xT, const T* weight, const int* indices, const T* bias, T* yT,
                          int num_labels, int fan_in, int batch, int in_features) {
  constexpr int TB = WARP * S;
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  Slot* slots = (Slot*)shared_memory() + warp * WARP;
  T* tile = (T*)((Slot*)shared_memory() + warps * WARP);
  for (int b0 = 0; b0 < batch; b0 += TB) {
    __syncthreads();  // nobody reads the previous tile any more
    stage_tile<TB>(tile, xT, in_features, batch, b0);
    __syncthreads();
    const int b = b0 + S * lane;
    const long long first = (long long)blockIdx.x * warps + warp, stride = (long long)gridDim.x * warps;
    Slot next = load_slot(weight, indices, first, 0, num_labels, fan_in, lane);
    for (long long label = first; label < num_labels; label += stride) {
      float acc[S];
#pragma unroll
      for (int i = 0; i < S; ++i) acc[i] = to_float(bias[label]);
      for (int j0 = 0; j0 < fan_in; j0 += WARP) {
        publish_slots(slots, next, lane);
        next = prefetch_next(weight, indices, label, j0, stride, num_labels, fan_in, lane);
        const int n = fan_in - j0 < WARP ? fan_in - j0 : WARP;
#pragma unroll 8  // eight independent shared-memory reads in flight, not one at a time
        for (int j = 0; j < n; ++j) {
          const Samples<T, S> x = *(const Samples<T, S>*)(tile + slots[j].index * TB + S * lane);
#pragma unroll
          for (int i = 0; i < S; ++i) acc[i] += slots[j].weight * to_float(x.v[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < S; ++i)
        if (b + i < batch) yT[label * batch + b + i] = from_float<T>(acc[i]);
    }
  }
}

// Given part[i] (i < N, N a power of two up to 32) in every lane, return in lane t the sum over
// all 32 lanes of part[t % N]. A butterfly: at each step a lane keeps half of its values, swaps
// the other half with its partner and adds, so N = 16 sums cost 8 + 4 + 2 + 1 + 1 = 16 shuffles,
// not 16 x 5 for 16 separate reductions. (N = 16 in grad-w, not 32: with 32, ptxas moved the array
// to local memory.)
template <int N>
__device__ inline float warp_sums_transposed(float* part, int lane) {
#pragma unroll
  for (int half = N / 2; half > 0; half >>= 1) {
    const bool upper = lane & half;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float low = part[i], high = part[i + half];
      part[i] = (upper ? high : low) + __shfl_xor_sync(FULL_MASK, upper ? low : high, half);
    }
  }
  float sum = part[0];
#pragma unroll
  for (int other = N; other < WARP; other <<= 1) sum += __shfl_xor_sync(FULL_MASK, sum, other);  // lanes t ^ N, ...
  return sum;
}

// grad_weight[l, j] = sum_b grad_yT[l, b] * xT[indices[l, j], b] (float output; the caller casts).
// Every lane multiplies its S samples for 16 slots at a time, then warp_sums_transposed leaves
// each slot's sum over the tile in one lane (slot j0 + t in lane t), which adds it to the output:
// a plain read-modify-write, since the same lane of the same warp owns (l, j) in every tile.
template <typename T, int S>
__global__ void __launch_bounds__(1024)
fixed_fanin_grad_weight_tiled(const T* grad_yT, const T* xT, const int* indices, float* grad_weight,
                              int num_labels, int fan_in, int batch, int in_features) {
  constexpr int TB = WARP * S;
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  Slot* slots = (Slot*)shared_memory() + warp * WARP;
  T* tile = (T*)((Slot*)shared_memory() + warps * WARP);
  for (int b0 = 0; b0 < batch; b0 += TB) {
    __syncthreads();
    stage_tile<TB>(tile, xT, in_features, batch, b0);
    __syncthreads();
    const int b = b0 + S * lane;
    const long long first = (long long)blockIdx.x * warps + warp, stride = (long long)gridDim.x * warps;
    Slot next = load_slot((const T*)nullptr, indices, first, 0, num_labels, fan_in, lane);
    for (long long label = first; label < num_labels; label += stride) {
      float g[S];  // this lane's samples of grad_y[label]
#pragma unroll
      for (int i = 0; i < S; ++i) g[i] = b + i < batch ? to_float(grad_yT[label * batch + b + i]) : 0.0f;
      for (int j0 = 0; j0 < fan_in; j0 += WARP) {
        publish_slots(slots, next, lane);
        next = prefetch_next((const T*)nullptr, indices, label, j0, stride, num_labels, fan_in, lane);
        float mine = 0.0f;  // this lane's slot j0 + lane, summed over the tile
        for (int h = 0; h < WARP; h += 16) {
          float part[16];
#pragma unroll
          for (int j = 0; j < 16; ++j) {  // slots past fan_in read row 0; their sums are dropped
            const Samples<T, S> x = *(const Samples<T, S>*)(tile + slots[h + j].index * TB + S * lane);
            part[j] = 0.0f;
#pragma unroll
            for (int i = 0; i < S; ++i) part[j] += g[i] * to_float(x.v[i]);
          }
          const float sum = warp_sums_transposed<16>(part, lane);  // slot h + lane % 16
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

constexpr int GATHER_CHUNK = 256;  // labels per chunk: 64 KB of grad_yT in fp32 at TILE_B = 64
constexpr int GATHER_BATCH = 8;    // slots whose shared-memory reads are issued together
static_assert(WARP % GATHER_BATCH == 0, "a batch never reads past the warp's 32 slots");

// The warp's slot piece that starts at entry e of `order` (index = feature offset << 16 | local
// label, as the loops below unpack it); weight 0 and index of feature 0 past `end`. `position`
// receives the slot's flat position l * k + j (v6 writes grad-w there).
template <typename T>
__device__ inline Slot load_transposed_slot(const T* weight, const int* indices, const int* order, int e,
                                            int end, long long first_label, int first_feature,
                                            int fan_in, int lane, int& position) {
  Slot s = {0, 0.0f};
  position = 0;
  if (e + lane < end) {
    position = order[e + lane];
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
    int position;  // unused by v5
    Slot next = load_transposed_slot(weight, indices, order, begin, end, first_label, first_feature, fan_in, lane, position);
    int feature = 0;  // offset of the feature whose sum acc0, acc1 hold
    float acc0 = 0.0f, acc1 = 0.0f;
    for (int e0 = begin; e0 < end; e0 += WARP) {
      publish_slots(slots, next, lane);
      next = load_transposed_slot(weight, indices, order, e0 + WARP, end, first_label, first_feature, fan_in, lane, position);
      const int n = end - e0 < WARP ? end - e0 : WARP;
      for (int j0 = 0; j0 < n; j0 += GATHER_BATCH) {
        // All loads of a batch first, then the arithmetic: the flush below stores to shared
        // memory, and the compiler may not move a later load above a store it cannot prove to
        // go elsewhere. (Measured: it bought nothing, 1.72 ms with the plain loop and with this
        // one; the kernel waits on the global loads at each chunk's start, kernels_notes.md.)
        Slot s[GATHER_BATCH];
        Samples<T, 2> gy[GATHER_BATCH];
#pragma unroll
        for (int u = 0; u < GATHER_BATCH; ++u) {  // slots past n hold index 0: a harmless read
          s[u] = slots[j0 + u];
          gy[u] = *(const Samples<T, 2>*)(chunk_grad + (s[u].index & 0xffff) * TILE_B + 2 * lane);
        }
#pragma unroll
        for (int u = 0; u < GATHER_BATCH; ++u) {
          if (j0 + u >= n) break;
          if (s[u].index >> 16 != feature) {  // the same for the whole warp: the run moved on a feature
            my_sums[feature * TILE_B] += acc0;
            my_sums[feature * TILE_B + 1] += acc1;
            feature = s[u].index >> 16;
            acc0 = acc1 = 0.0f;
          }
          acc0 += s[u].weight * to_float(gy[u].v[0]);
          acc1 += s[u].weight * to_float(gy[u].v[1]);
        }
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

// =============================================================================================
// v6: one backward pass computes grad-x and grad-w (issue 14; property-tested on the CPU, not yet
// measured on a GPU: sparse_layer.py selects it as backend "cuda-v6" until it has been).
//
// What changes against the v5 gather, each aimed at a bound the H200 measured (kernels_notes.md):
//  * Staging overlaps the work. v5's warps all waited at each chunk's start for the chunk's
//    grad_yT rows and then for a chain of dependent loads (run bounds, then slots). Here the
//    block copies the next chunk into a second buffer with cp.async while it works on this one,
//    and reads the next chunk's run bounds early.
//  * grad-w rides along. The warp that owns feature d keeps x[d, its samples] in registers, and
//    the chunk's grad_y rows are already in shared memory, so grad_w[l, j] over the batch tile
//    costs S multiply-adds and a share of a warp butterfly per slot; the separate grad-w kernel
//    staged x tiles and fetched every slot again. Each slot belongs to exactly one (chunk,
//    feature) run, so one lane of one block writes it: no atomics. A block walks the batch tiles
//    itself, adding each tile's sum to the last (a fixed order: the same bits every run).
//  * S samples per lane, 8 bytes per shared-memory read in every dtype (16 bit: S = 4).
//
// Dynamic shared memory: [W x 32 Slots][W x 32 positions][2 chunks: GATHER_CHUNK x TB of T]
//                        [accumulators: W * features_per_warp x TB floats].

#ifndef CUDA_SHIM  // tests/cuda_shim.h provides its own, which delay each copy until its wait
// Start copying 8 bytes from global to shared memory (the first source_bytes of them; the rest
// become zeros) without waiting for them; sm_80 and later.
__device__ inline void copy_async_8(void* shared_destination, const void* global_source, int source_bytes) {
  unsigned int destination;
  asm volatile("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }"
               : "=r"(destination) : "l"(shared_destination));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(destination), "l"(global_source),
               "r"(source_bytes) : "memory");
}
// Close the group of copies started since the last commit.
__device__ inline void copy_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Wait until at most `pending` of this thread's committed groups are still in flight.
template <int pending> __device__ inline void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory");
}
#endif

// Start copying chunk c's grad_yT rows, samples [b0, b0 + TB), into `chunk` (zeros past L and B),
// one 8-byte piece (S samples) per copy, and commit them as one group. Where B is not a multiple
// of S, or the tensor is not 8-byte aligned, the pieces are not aligned either: plain loads then.
template <typename T, int S>
__device__ inline void stage_chunk(T* chunk, const T* grad_yT, int c, int num_chunks, int num_labels,
                                   int batch, int b0) {
  constexpr int TB = WARP * S;
  const bool pieces = batch % S == 0 && (unsigned long long)grad_yT % (S * sizeof(T)) == 0;
  const long long first_label = (long long)c * GATHER_CHUNK;
  for (int e = threadIdx.x; c < num_chunks && e < GATHER_CHUNK * WARP; e += blockDim.x) {
    const long long label = first_label + e / WARP;
    const int b = b0 + S * (e % WARP);
    T* destination = chunk + (e / WARP) * TB + S * (e % WARP);
    const T* source = grad_yT + label * batch + b;
    if (pieces) {
      const bool inside = label < num_labels && b < batch;
      copy_async_8(destination, inside ? source : grad_yT, inside ? 8 : 0);
    } else {
#pragma unroll
      for (int i = 0; i < S; ++i)
        destination[i] = label < num_labels && b + i < batch ? source[i] : from_float<T>(0.0f);
    }
  }
  copy_async_commit();
}

// This lane's S samples of row d of xT (zeros past B, or where d is past `end`), as stored: the
// prefetched next row stays in 16 bit, which saved the registers half16 had spilled.
template <typename T, int S>
__device__ inline Samples<T, S> load_samples(const T* xT, int d, int end, int batch, int b) {
  Samples<T, S> out;
#pragma unroll
  for (int i = 0; i < S; ++i) out.v[i] = d < end && b + i < batch ? xT[(long long)d * batch + b + i] : from_float<T>(0.0f);
  return out;
}

constexpr int BACKWARD_BATCH = 4;  // slots read together (8 spilled registers to local memory)

// partial_x[group, d, b] = the group's chunks' share of grad_xT[d, b], as in the v5 gather, and
// grad_weight[l, j] = sum_b grad_yT[l, b] * xT[indices[l, j], b] (float; null: not wanted).
template <typename T, int S>
__global__ void __launch_bounds__(1024, 1)
fixed_fanin_backward_gather(const T* grad_yT, const T* xT, const T* weight, const int* indices,
                            const int* order, const int* starts, float* partial_x, float* grad_weight,
                            int num_labels, int fan_in, int batch, int in_features, int features_per_warp,
                            int groups) {
  static_assert(S * sizeof(T) == 8, "stage_chunk copies 8-byte pieces");
  constexpr int TB = WARP * S;
  const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
  Slot* slots = (Slot*)shared_memory() + warp * WARP;
  int* positions = (int*)((Slot*)shared_memory() + warps * WARP) + warp * WARP;
  T* buffers = (T*)((int*)((Slot*)shared_memory() + warps * WARP) + warps * WARP);
  float* sums = (float*)(buffers + 2 * GATHER_CHUNK * TB);
  // This block: group g of the chunks, feature part p; it walks every batch tile.
  const int features_per_block = warps * features_per_warp;
  const int g = blockIdx.x % groups, p = blockIdx.x / groups;
  const int first_feature = p * features_per_block + warp * features_per_warp;  // this warp's run
  const int last_feature = first_feature + features_per_warp < in_features ? first_feature + features_per_warp
                                                                          : in_features;  // exclusive
  const bool has_features = first_feature < last_feature;  // a warp past D (the last part) has none
  const int num_chunks = (num_labels + GATHER_CHUNK - 1) / GATHER_CHUNK;
  // chunks per batch tile; at least one, as the caller launches no more groups than chunks (else
  // this block's slice of partial_x would stay unwritten)
  const int my_chunks = g < num_chunks ? (num_chunks - g + groups - 1) / groups : 0;
  const int tiles = (batch + TB - 1) / TB;
  float* my_sums = sums + warp * features_per_warp * TB + S * lane;
  // Step i of the block: batch tile i / my_chunks, chunk g + (i % my_chunks) * groups.
  auto chunk_of = [&](int i) { return g + i % my_chunks * groups; };
  auto run_bound = [&](int i, int feature) {  // where chunk i's slots of this warp's `feature` begin
    return has_features && i < my_chunks * tiles ? starts[(long long)chunk_of(i) * in_features + feature] : 0;
  };
  if (my_chunks > 0) stage_chunk<T, S>(buffers, grad_yT, chunk_of(0), num_chunks, num_labels, batch, 0);
  int begin = run_bound(0, first_feature), end = run_bound(0, last_feature);
  for (int i = 0; i < my_chunks * tiles; ++i) {
    const int c = chunk_of(i), b0 = i / my_chunks * TB, b = b0 + S * lane;
    const long long first_label = (long long)c * GATHER_CHUNK;
    if (i % my_chunks == 0)  // a new batch tile: its sums start from zero
      for (int e = threadIdx.x; e < features_per_block * TB; e += blockDim.x) sums[e] = 0.0f;
    // The next step's chunk starts copying now, into the other buffer; its run bounds load now.
    T* chunk_grad = buffers + i % 2 * GATHER_CHUNK * TB;
    const int ahead = i + 1 < my_chunks * tiles ? chunk_of(i + 1) : num_chunks;  // num_chunks: none
    stage_chunk<T, S>(buffers + (i + 1) % 2 * GATHER_CHUNK * TB, grad_yT, ahead, num_chunks, num_labels,
                      batch, (i + 1) / my_chunks * TB);
    const int next_begin = run_bound(i + 1, first_feature), next_end = run_bound(i + 1, last_feature);
    float x[S];  // x of the warp's current feature (x_next: of the one after it, as stored)
    const Samples<T, S> x_first = load_samples<T, S>(xT, first_feature, last_feature, batch, b);
#pragma unroll
    for (int k = 0; k < S; ++k) x[k] = to_float(x_first.v[k]);
    Samples<T, S> x_next = load_samples<T, S>(xT, first_feature + 1, last_feature, batch, b);
    int position;
    Slot next = load_transposed_slot(weight, indices, order, begin, end, first_label, first_feature, fan_in,
                                     lane, position);
    copy_async_wait<1>();  // this thread's copies of this chunk have landed (the next one's may not)
    __syncthreads();       // and so have everybody else's; the zeroed sums are visible too
    int feature = 0;       // offset of the feature whose sums acc and x hold
    float acc[S] = {};
    for (int e0 = begin; e0 < end; e0 += WARP) {
      __syncwarp();  // every lane has finished reading the previous piece
      slots[lane] = next;
      positions[lane] = position;
      __syncwarp();
      next = load_transposed_slot(weight, indices, order, e0 + WARP, end, first_label, first_feature, fan_in,
                                  lane, position);
      const int n = end - e0 < WARP ? end - e0 : WARP;
      for (int j0 = 0; j0 < n; j0 += BACKWARD_BATCH) {
        Slot s[BACKWARD_BATCH];
        Samples<T, S> gy[BACKWARD_BATCH];
#pragma unroll
        for (int u = 0; u < BACKWARD_BATCH; ++u) {  // slots past n hold index 0: a harmless read
          s[u] = slots[j0 + u];
          gy[u] = *(const Samples<T, S>*)(chunk_grad + (s[u].index & 0xffff) * TB + S * lane);
        }
        float part[BACKWARD_BATCH];  // this lane's share of each slot's grad-w
#pragma unroll
        for (int u = 0; u < BACKWARD_BATCH; ++u) {
          part[u] = 0.0f;
          if (j0 + u >= n) continue;
          if (s[u].index >> 16 != feature) {  // the same for the whole warp: the run moved on a feature
#pragma unroll
            for (int k = 0; k < S; ++k) my_sums[feature * TB + k] += acc[k], acc[k] = 0.0f;
            const int previous = feature;
            feature = s[u].index >> 16;
            // the usual case: the run moved on to the next feature, whose x was loaded early
            const Samples<T, S> row = feature == previous + 1
                                          ? x_next : load_samples<T, S>(xT, first_feature + feature, last_feature, batch, b);
#pragma unroll
            for (int k = 0; k < S; ++k) x[k] = to_float(row.v[k]);
            x_next = load_samples<T, S>(xT, first_feature + feature + 1, last_feature, batch, b);
          }
#pragma unroll
          for (int k = 0; k < S; ++k) {
            const float gyk = to_float(gy[u].v[k]);
            acc[k] += s[u].weight * gyk;
            part[u] += x[k] * gyk;
          }
        }
        if (grad_weight) {  // lane t < BACKWARD_BATCH adds slot j0 + t's sum over the tile
          const float sum = warp_sums_transposed<BACKWARD_BATCH>(part, lane);
          if (lane < BACKWARD_BATCH && j0 + lane < n) {
            float* out = grad_weight + positions[j0 + lane];
            *out = (b0 == 0 ? 0.0f : *out) + sum;
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < S; ++k) my_sums[feature * TB + k] += acc[k];
    begin = next_begin, end = next_end;
    __syncthreads();  // every warp is done with this chunk's buffer and has added its sums
    if (i % my_chunks == my_chunks - 1)  // the tile's last chunk: write its sums
      for (int e = threadIdx.x; e < features_per_block * TB; e += blockDim.x) {
        const int d = p * features_per_block + e / TB, bb = b0 + e % TB;
        if (d < in_features && bb < batch) partial_x[((long long)g * in_features + d) * batch + bb] = sums[e];
      }
  }
}
