// Stand-ins for the CUDA built-ins cuda/ms_deform_attn_kernel.cu uses, so that its
// unchanged text runs on the CPU (tests/cuda_emulation/__init__.py puts this header in
// place of the c10/cuda includes and turns each <<<>>> launch into emulated_launch).
//
// Blocks run one after another; the threads of a block run at once, one std::thread
// each, so __syncthreads is a std::barrier, __shared__ a static (one block alive at a
// time), and the warp shuffle a rendezvous of the lanes its mask names. What CUDA leaves
// undefined and a GPU may forgive (a lane outside the mask, a lane that left early, a
// misaligned vector atomic) throws here, and the launch raises with the first message.
#pragma once

// torch before __CUDA_ARCH__ is defined: its headers must see a host compile. ATen and
// torch/library.h, not torch/extension.h: half the compile time, and no pybind11.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if !defined(EMULATED_CUDA_ARCH) || !defined(EMULATED_OPS)
#error "define EMULATED_CUDA_ARCH (800 for sm_80, 900 for sm_90) and EMULATED_OPS"
#endif
#define __CUDA_ARCH__ EMULATED_CUDA_ARCH
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// A device-side assert fails the launch (on a GPU: "device-side assert triggered").
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  if (!(cond)) throw std::runtime_error("device-side assert failed: " #cond)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx, blockIdx, blockDim;

namespace emulation {

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::runtime_error(message);
}

// The lanes of one warp meeting in __shfl_xor_sync. Each mask has its own round: lanes
// arrive with their value, all read once the mask's lanes are in, and the round closes
// when all have read, so a lane cannot overwrite a value a slower lane still needs.
class Warp {
 public:
  float exchange(unsigned mask, unsigned lane, float value, unsigned source) {
    std::unique_lock lock(mutex_);
    require(mask >> lane & 1u, "__shfl_xor_sync: lane " + std::to_string(lane) +
                                   " is not in its mask " + std::to_string(mask));
    require(mask >> source & 1u, "__shfl_xor_sync: source lane " + std::to_string(source) +
                                     " is not in the mask " + std::to_string(mask));
    wait(lock, [&] { return !rounds_[mask].reading; }, mask);
    Round& round = rounds_[mask];
    values_[lane] = value;
    round.arrived |= 1u << lane;
    if (round.arrived == mask) round.reading = true;
    changed_.notify_all();
    wait(lock, [&] { return round.reading; }, mask, &round);
    const float result = values_[source];
    round.departed |= 1u << lane;
    if (round.departed == mask) round = Round{};
    changed_.notify_all();
    return result;
  }

  void exit(unsigned lane) {
    const std::lock_guard lock(mutex_);
    exited_ |= 1u << lane;
    changed_.notify_all();
  }

 private:
  struct Round {
    unsigned arrived = 0, departed = 0;
    bool reading = false;
  };

  // Waits for ready(); a lane of the mask that left the kernel, or half a minute without
  // progress, means the lanes of the mask will never all arrive.
  template <typename Ready>
  void wait(std::unique_lock<std::mutex>& lock, Ready ready, unsigned mask,
            const Round* round = nullptr) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!ready()) {
      const unsigned missing = round ? mask & ~round->arrived : 0u;
      require(!(missing & exited_), "__shfl_xor_sync: a lane of mask " + std::to_string(mask) +
                                        " left the kernel before the shuffle");
      require(changed_.wait_until(lock, deadline) == std::cv_status::no_timeout || ready(),
              "__shfl_xor_sync: the lanes of mask " + std::to_string(mask) + " never met");
    }
  }

  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<unsigned, Round> rounds_;
  float values_[32] = {};
  unsigned exited_ = 0;
};

struct Block {
  std::barrier<>* barrier;
  Warp* warps;
};
inline thread_local Block block;

}  // namespace emulation

inline void __syncthreads() { emulation::block.barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int width = 32) {
  const unsigned lane = threadIdx.x % 32;
  unsigned source = lane ^ static_cast<unsigned>(lane_mask);
  // CUDA: a source beyond this lane's segment of `width` lanes gives the lane its own value.
  if (source >= (lane & ~static_cast<unsigned>(width - 1)) + static_cast<unsigned>(width)) {
    source = lane;
  }
  return emulation::block.warps[threadIdx.x / 32].exchange(mask, lane, value, source);
}

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}

#if EMULATED_CUDA_ARCH >= 900  // the vector atomics exist from sm_90 on
template <typename Vector>
Vector* aligned_vector(Vector* address) {
  emulation::require(reinterpret_cast<std::uintptr_t>(address) % alignof(Vector) == 0,
                     "vector atomicAdd on a misaligned address");
  return address;
}

inline float2 atomicAdd(float2* address, float2 value) {
  float* f = &aligned_vector(address)->x;
  return {atomicAdd(f, value.x), atomicAdd(f + 1, value.y)};
}

inline float4 atomicAdd(float4* address, float4 value) {
  float* f = &aligned_vector(address)->x;
  return {atomicAdd(f, value.x), atomicAdd(f + 1, value.y), atomicAdd(f + 2, value.z),
          atomicAdd(f + 3, value.w)};
}
#endif

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace c10::cuda

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

#include "ms_deform_attn.h"  // the build folder's copy, which includes ATen

// torch.ops.<EMULATED_OPS>.forward and .backward, with the real op's signatures.
TORCH_LIBRARY(EMULATED_OPS, m) {
  m.def("forward", &frozenseg::ms_deform_attn_cuda_forward);
  m.def("backward", &frozenseg::ms_deform_attn_cuda_backward);
}

// kernel<<<grid, threads, shared_bytes, stream>>>(args...), blocks one after another.
template <typename... Params, typename... Args>
void emulated_launch(void (*kernel)(Params...), unsigned grid, unsigned threads,
                     size_t shared_bytes, c10::cuda::CUDAStream, Args... args) {
  emulation::require(shared_bytes == 0, "dynamic shared memory is not emulated");
  std::string failure;
  std::mutex failure_mutex;
  for (unsigned b = 0; b < grid && failure.empty(); ++b) {
    std::barrier<> barrier(threads);
    std::vector<emulation::Warp> warps((threads + 31) / 32);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        blockDim = {threads, 1, 1};
        emulation::block = {&barrier, warps.data()};
        try {
          kernel(args...);
        } catch (const std::exception& err) {
          const std::lock_guard lock(failure_mutex);
          if (failure.empty()) {
            failure = std::string(err.what()) + " (block " + std::to_string(b) + ", thread " +
                      std::to_string(t) + ")";
          }
        }
        warps[t / 32].exit(t % 32);
        barrier.arrive_and_drop();  // a thread that returned no longer holds __syncthreads up
      });
    }
    for (auto& thread : pool) thread.join();
  }
  TORCH_CHECK(failure.empty(), "emulated kernel launch failed: ", failure);
}
