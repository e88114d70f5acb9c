// Just enough of CUDA for g++ to compile and run ../kernels.cu on the CPU, so that CI (no GPU)
// property-tests the exact kernel source against the dense reference.
//
// launch() runs the grid block after block; inside a block every CUDA thread is a real
// std::thread, so __syncthreads() is a std::barrier over the block, __syncwarp() one over the
// thread's warp of 32, and atomicAdd is a real atomic. __shfl_xor_sync goes through a per-block
// exchange array between two warp barriers. Dynamic shared memory is one buffer per block, filled
// with NaN bytes so that reading what no thread wrote shows up in the results.
#pragma once
#include <atomic>
#include <barrier>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define CUDA_SHIM
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;
inline std::vector<unsigned long long> block_shared;  // blocks run one at a time: one buffer
inline std::vector<float> shuffle_exchange;

inline void* shared_memory() { return block_shared.data(); }

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

inline void __syncwarp() { warp_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  shuffle_exchange[threadIdx.x] = value;
  warp_barrier->arrive_and_wait();
  float other = shuffle_exchange[threadIdx.x ^ lane_mask];
  warp_barrier->arrive_and_wait();  // nobody overwrites a value before its partner has read it
  return other;
}

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}

inline unsigned int __float_as_uint(float v) {
  unsigned int u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

inline float __uint_as_float(unsigned int u) {
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// kernel<<<grid, block, shared_bytes>>>(args...) for 1-D grids and blocks (block a multiple of 32
// when the kernel uses warp functions).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int grid, unsigned int block, unsigned int shared_bytes,
            Args... args) {
  gridDim.x = grid;
  blockDim.x = block;
  shuffle_exchange.assign(block, 0.0f);
  for (unsigned int b = 0; b < grid; ++b) {
    block_shared.assign((shared_bytes + 7) / 8, ~0ull);  // NaN in every float and double
    std::barrier<> barrier(block);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned int first = 0; first < block; first += 32)  // one barrier per warp of 32 threads
      warps.push_back(std::make_unique<std::barrier<>>(block - first < 32 ? block - first : 32));
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block; ++t) {
      threads.emplace_back([&, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        block_barrier = &barrier;
        warp_barrier = warps[t / 32].get();
        kernel(args...);
      });
    }
    for (auto& thread : threads) thread.join();
  }
}
