// Just enough of CUDA for g++ to compile and run ../kernels.cu on the CPU, so that CI (no GPU)
// property-tests the exact kernel source against the dense reference.
//
// launch() runs the grid block after block; inside a block every CUDA thread is a real
// std::thread, so __syncthreads() is a std::barrier and atomicAdd must be a real atomic.
// __shared__ becomes `static`: blocks never run at the same time, so one copy per kernel serves.
#pragma once
#include <atomic>
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline thread_local std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

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

// kernel<<<grid, block>>>(args...) for 1-D grids and blocks.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned int grid, unsigned int block, Args... args) {
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned int b = 0; b < grid; ++b) {
    std::barrier<> barrier(block);
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block; ++t) {
      threads.emplace_back([&, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        block_barrier = &barrier;
        kernel(args...);
      });
    }
    for (auto& thread : threads) thread.join();
  }
}
