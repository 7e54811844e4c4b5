// Multi-scale deformable attention kernels.
//
// Work split: a group of `lanes` threads (a power of two, at most a warp) owns one
// (batch, query, head); each thread owns VEC contiguous channels of the head and
// reads them with one vector load per bilinear corner. A point's bilinear
// weights are computed once per thread and shared by its VEC channels.
//
// Backward: each thread scatters its channels of the value gradient with
// (vector, on sm_90+) float32 atomics, and the gradients of a point's location
// and attention weight, partial sums over channels, are reduced across the group
// with warp shuffles. Location and weight gradients are written exactly once,
// so only the value gradient buffer is zeroed.
// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS, cuSPARSE
// and cuSOLVER headers, which minimal toolkits lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace frozenseg {
namespace {

constexpr int kThreads = 256;

// The sampling arithmetic is the CPU kernel's (ms_deform_attn_sampling.h): the pixel
// coordinate, the neighbours and their weights, the weighted sum, the point gradients.
using Bilinear = sampling::Bilinear<float>;
using sampling::bilinear;
using sampling::pixel_coordinate;
using sampling::touches_map;

struct Geometry {
  int64_t groups;  // N * Q * M: one thread group each
  int64_t spatial;  // S
  int heads;        // M
  int channels;     // D
  int levels;       // L
  int queries;      // Q
  int points;       // P
  int lanes;        // threads per group
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ void load_floats(const scalar_t* __restrict__ src, float (&out)[VEC]) {
  const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(src);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<float>(pack.v[i]);
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store_floats(scalar_t* __restrict__ dst, const float (&in)[VEC]) {
  Pack<scalar_t, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = static_cast<scalar_t>(in[i]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(dst) = pack;
}

template <int VEC>
__device__ __forceinline__ void atomic_add_floats(float* dst, const float (&in)[VEC]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i), make_float4(in[i], in[i + 1], in[i + 2], in[i + 3]));
    }
    return;
  } else if constexpr (VEC % 2 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      atomicAdd(reinterpret_cast<float2*>(dst + i), make_float2(in[i], in[i + 1]));
    }
    return;
  }
#endif
#pragma unroll
  for (int i = 0; i < VEC; ++i) atomicAdd(dst + i, in[i]);
}

// Loads the VEC channels of the four corners (zero where a corner is outside).
template <int VEC, typename scalar_t>
__device__ __forceinline__ void load_corners(const scalar_t* __restrict__ level_value, int64_t row,
                                             const Bilinear& b, float (&v)[4][VEC]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (b.offset[k] >= 0) {
      load_floats<VEC>(level_value + b.offset[k] * row, v[k]);
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[k][i] = 0.f;
    }
  }
}

struct Levels {
  int h[kMaxLevels], w[kMaxLevels];
  int64_t start[kMaxLevels];
};

// The levels must tile value's S positions, or they are read (and in backward written)
// out of bounds. The host checks this only for CPU spatial_shapes, which it can read
// without waiting for the device; here a mismatch is a device-side assert.
__device__ __forceinline__ void load_levels(Levels& s, const int64_t* __restrict__ shapes,
                                            const int64_t* __restrict__ starts, int levels,
                                            int64_t spatial) {
  for (int l = threadIdx.x; l < levels; l += blockDim.x) {
    const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
    const int64_t start = l == 0 ? 0 : starts[l - 1] + shapes[2 * l - 2] * shapes[2 * l - 1];
    CUDA_KERNEL_ASSERT(h >= 0 && w >= 0 && starts[l] == start);
    CUDA_KERNEL_ASSERT(l + 1 < levels || start + h * w == spatial);
    s.h[l] = static_cast<int>(h);
    s.w[l] = static_cast<int>(w);
    s.start[l] = starts[l];
  }
  __syncthreads();
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const float* __restrict__ locations,
                   const float* __restrict__ weights, scalar_t* __restrict__ output, Geometry g) {
  __shared__ Levels lv;
  load_levels(lv, shapes, starts, g.levels, g.spatial);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread / g.lanes;
  const int c0 = static_cast<int>(thread % g.lanes) * VEC;
  if (group >= g.groups || c0 >= g.channels) return;

  const int head = static_cast<int>(group % g.heads);
  const int64_t batch = group / (static_cast<int64_t>(g.heads) * g.queries);
  const int64_t row = static_cast<int64_t>(g.heads) * g.channels;  // stride of one position
  const scalar_t* value_head = value + batch * g.spatial * row + head * g.channels + c0;
  const float2* loc = reinterpret_cast<const float2*>(locations) + group * g.levels * g.points;
  const float* wts = weights + group * g.levels * g.points;

  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  for (int l = 0; l < g.levels; ++l) {
    const int h = lv.h[l], w = lv.w[l];
    const scalar_t* level_value = value_head + lv.start[l] * row;
    for (int p = 0; p < g.points; ++p, ++loc, ++wts) {
      const float2 xy = *loc;
      const float x = pixel_coordinate(xy.x, w), y = pixel_coordinate(xy.y, h);
      if (!touches_map(x, y, h, w)) continue;
      const float a = *wts;
      const Bilinear b = bilinear(x, y, h, w);
      float v[4][VEC];
      load_corners<VEC>(level_value, row, b, v);
      sampling::add_weighted_sample(b, a, v, VEC, acc);
    }
  }
  store_floats<VEC>(output + group * g.channels + c0, acc);
}

// Mask of the lanes of this thread's group inside its warp (groups never straddle warps).
__device__ __forceinline__ unsigned group_mask(int lanes) {
  if (lanes == 32) return 0xffffffffu;
  const int first = (threadIdx.x & 31) & ~(lanes - 1);
  return ((1u << lanes) - 1u) << first;
}

__device__ __forceinline__ float group_sum(float v, int lanes, unsigned mask) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(mask, v, offset, lanes);
  }
  return v;
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const float* __restrict__ locations,
                    const float* __restrict__ weights, const scalar_t* __restrict__ grad_output,
                    float* __restrict__ grad_value, float* __restrict__ grad_locations,
                    float* __restrict__ grad_weights, Geometry g) {
  __shared__ Levels lv;
  load_levels(lv, shapes, starts, g.levels, g.spatial);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread / g.lanes;
  const int lane = static_cast<int>(thread % g.lanes);
  const int c0 = lane * VEC;
  if (group >= g.groups) return;  // whole groups leave together: the shuffles stay legal
  // Padding lanes (c0 >= D) take part in the reductions with zeros.
  const bool has_channels = c0 < g.channels;
  const unsigned mask = group_mask(g.lanes);

  const int head = static_cast<int>(group % g.heads);
  const int64_t batch = group / (static_cast<int64_t>(g.heads) * g.queries);
  const int64_t row = static_cast<int64_t>(g.heads) * g.channels;
  const int64_t head_offset = batch * g.spatial * row + head * g.channels + c0;
  const int64_t first_point = group * g.levels * g.points;

  float go[VEC];
  if (has_channels) {
    load_floats<VEC>(grad_output + group * g.channels + c0, go);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) go[i] = 0.f;
  }

  for (int l = 0; l < g.levels; ++l) {
    const int h = lv.h[l], w = lv.w[l];
    const int64_t level_offset = head_offset + lv.start[l] * row;
    for (int p = 0; p < g.points; ++p) {
      const int64_t point = first_point + l * g.points + p;
      const float2 xy = reinterpret_cast<const float2*>(locations)[point];
      const float a = weights[point];
      const float x = pixel_coordinate(xy.x, w), y = pixel_coordinate(xy.y, h);
      float grad_a = 0.f, grad_x = 0.f, grad_y = 0.f;  // this thread's channels only
      if (has_channels && touches_map(x, y, h, w)) {
        const Bilinear b = bilinear(x, y, h, w);
        float v[4][VEC];
        load_corners<VEC>(value + level_offset, row, b, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          sampling::add_point_gradients(b, v, i, go[i], grad_a, grad_x, grad_y);
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (b.offset[k] < 0) continue;
          float add[VEC];
          const float cw = a * b.weight[k];
#pragma unroll
          for (int i = 0; i < VEC; ++i) add[i] = cw * go[i];
          atomic_add_floats<VEC>(grad_value + level_offset + b.offset[k] * row, add);
        }
      }
      grad_a = group_sum(grad_a, g.lanes, mask);
      grad_x = group_sum(grad_x, g.lanes, mask);
      grad_y = group_sum(grad_y, g.lanes, mask);
      if (lane == 0) {
        grad_weights[point] = grad_a;
        reinterpret_cast<float2*>(grad_locations)[point] = make_float2(
            sampling::location_gradient(a, w, grad_x), sampling::location_gradient(a, h, grad_y));
      }
    }
  }
}

// Channels per thread: the widest 16-byte-or-less vector that divides D, keeps
// the pointers aligned and fits a head in one warp; wider if D needs it.
int channels_per_thread(int channels, int element_size, std::initializer_list<const void*> ptrs) {
  auto fits = [&](int vec) {
    if (channels % vec != 0 || (channels / vec) > 32) return false;
    for (const void* p : ptrs) {
      if (reinterpret_cast<std::uintptr_t>(p) % (vec * element_size) != 0) return false;
    }
    return true;
  };
  const int preferred = 16 / element_size;
  for (int vec = preferred; vec >= 1; vec /= 2) {
    if (fits(vec)) return vec;
  }
  for (int vec = preferred * 2; vec <= 8; vec *= 2) {
    if (fits(vec)) return vec;
  }
  TORCH_CHECK(false, "head dim ", channels, " is not supported by the CUDA kernel");
}

int next_power_of_two(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

template <typename F>
void with_vec(int vec, F&& f) {
  switch (vec) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

template <typename F>
void with_scalar_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "unsupported dtype ", dtype);
  }
}

Geometry geometry(const at::Tensor& value, const at::Tensor& locations) {
  Geometry g;
  g.spatial = value.size(1);
  g.heads = static_cast<int>(value.size(2));
  g.channels = static_cast<int>(value.size(3));
  g.queries = static_cast<int>(locations.size(1));
  g.levels = static_cast<int>(locations.size(3));
  g.points = static_cast<int>(locations.size(4));
  g.groups = value.size(0) * g.queries * g.heads;
  return g;
}

unsigned int blocks_for(const Geometry& g) {
  return static_cast<unsigned int>((g.groups * g.lanes + kThreads - 1) / kThreads);
}

}  // namespace

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const c10::cuda::CUDAGuard guard(value.device());
  Geometry g = geometry(value, sampling_locations);
  auto output = at::empty({value.size(0), g.queries, g.heads * g.channels}, value.options());
  if (g.groups == 0) return output;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_scalar_type(value.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const int vec = channels_per_thread(g.channels, sizeof(scalar_t),
                                        {value.data_ptr(), output.data_ptr()});
    g.lanes = next_power_of_two(g.channels / vec);
    with_vec(vec, [&](auto vec_tag) {
      forward_kernel<scalar_t, decltype(vec_tag)::value><<<blocks_for(g), kThreads, 0, stream>>>(
          static_cast<const scalar_t*>(value.data_ptr()), spatial_shapes.data_ptr<int64_t>(),
          level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<float>(),
          attention_weights.data_ptr<float>(), static_cast<scalar_t*>(output.data_ptr()), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return output;
}

std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  Geometry g = geometry(value, sampling_locations);
  // Atomics accumulate the value gradient, so it alone starts at zero; the
  // other two are written once per point.
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(at::kFloat));
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  if (g.groups > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    with_scalar_type(value.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      const int vec = channels_per_thread(g.channels, sizeof(scalar_t),
                                          {value.data_ptr(), grad_output.data_ptr()});
      g.lanes = next_power_of_two(g.channels / vec);
      with_vec(vec, [&](auto vec_tag) {
        backward_kernel<scalar_t, decltype(vec_tag)::value>
            <<<blocks_for(g), kThreads, 0, stream>>>(
                static_cast<const scalar_t*>(value.data_ptr()),
                spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
                sampling_locations.data_ptr<float>(), attention_weights.data_ptr<float>(),
                static_cast<const scalar_t*>(grad_output.data_ptr()),
                grad_value.data_ptr<float>(), grad_locations.data_ptr<float>(),
                grad_weights.data_ptr<float>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (value.scalar_type() != at::kFloat) grad_value = grad_value.to(value.scalar_type());
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace frozenseg
