// Multi-scale deformable attention on the CPU: forward and backward.
//
// The CUDA kernel's contract (ms_deform_attn.h) for value in float32, bfloat16 or
// float16 (accumulated in float32) and float64 (for the tests); sampling locations and
// attention weights come in the accumulation type. The sampling arithmetic is
// ms_deform_attn_sampling.h's.
//
// Work split: both passes walk (batch, head) slices, queries inner: a slice reads one
// head's channels of one image (S * D elements, which stay in cache; the whole value
// would not). The forward runs at::parallel_for over (slice, query) items, each writing
// its own output row. The backward runs over slices: a thread owns every position of its
// slice of the value gradient, so it adds to it without atomics, and every result is the
// same whatever the number of threads. Channels are innermost and
// contiguous in value, output and gradients, so the compiler vectorises the channel loops.
// Registered with torch.library as frozenseg_cpu::forward and frozenseg_cpu::backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ms_deform_attn_sampling.h"

namespace frozenseg {
namespace {

using sampling::Bilinear;

struct Geometry {
  int64_t batch, spatial, heads, channels, queries, levels, points;
  std::vector<int> h, w;
  std::vector<int64_t> start;

  int64_t row() const { return heads * channels; }  // elements between two positions
  int64_t points_per_group() const { return levels * points; }
};

Geometry geometry(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& locations) {
  Geometry g{value.size(0), value.size(1), value.size(2), value.size(3),
             locations.size(1), locations.size(3), locations.size(4), {}, {}, {}};
  const int64_t* shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  for (int64_t l = 0; l < g.levels; ++l) {
    g.h.push_back(static_cast<int>(shapes[2 * l]));
    g.w.push_back(static_cast<int>(shapes[2 * l + 1]));
    g.start.push_back(starts[l]);
    TORCH_CHECK(g.h[l] >= 0 && g.w[l] >= 0 && g.start[l] >= 0 &&
                    g.start[l] + int64_t{g.h[l]} * g.w[l] <= g.spatial,
                "level ", l, " (", g.h[l], "x", g.w[l], " from ", g.start[l],
                ") reaches past value's ", g.spatial, " positions");
  }
  return g;
}

// Enough queries per task that a task's set-up is noise next to its sampling.
int64_t grain(const Geometry& g) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.points_per_group() * g.channels));
}

// One row of a head's channels: on the stack when the head dim is a compile-time
// constant (kChannels > 0: the loops unroll and the row stays in vector registers), on
// the heap otherwise.
template <typename T, int kChannels>
struct ChannelRow {
  explicit ChannelRow(int) { clear(); }
  void clear() { std::fill(v, v + kChannels, T(0)); }
  T* data() { return v; }
  const T* data() const { return v; }
  T v[kChannels];
};

template <typename T>
struct ChannelRow<T, 0> {
  explicit ChannelRow(int channels) : v(channels, T(0)) {}
  void clear() { std::fill(v.begin(), v.end(), T(0)); }
  T* data() { return v.data(); }
  const T* data() const { return v.data(); }
  std::vector<T> v;
};

// Calls f with the head dim as a compile-time constant where it is a common one, else 0.
template <typename F>
void with_channels(int64_t channels, F&& f) {
  switch (channels) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

template <int kChannels, typename scalar_t, typename acc_t>
void forward_groups(const Geometry& g, const scalar_t* value, const acc_t* locations,
                    const acc_t* weights, scalar_t* output, int64_t begin, int64_t end) {
  const int channels = kChannels > 0 ? kChannels : static_cast<int>(g.channels);
  const ChannelRow<scalar_t, kChannels> zeros(channels);
  ChannelRow<acc_t, kChannels> acc(channels);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t slice = item / g.queries, q = item % g.queries;
    const int64_t batch = slice / g.heads, head = slice % g.heads;
    const int64_t group = (batch * g.queries + q) * g.heads + head;
    const scalar_t* value_head = value + batch * g.spatial * g.row() + head * g.channels;
    acc.clear();
    int64_t point = group * g.points_per_group();
    for (int64_t l = 0; l < g.levels; ++l) {
      const int h = g.h[l], w = g.w[l];
      for (int64_t p = 0; p < g.points; ++p, ++point) {
        const acc_t x = sampling::pixel_coordinate(locations[2 * point], w);
        const acc_t y = sampling::pixel_coordinate(locations[2 * point + 1], h);
        if (!sampling::touches_map(x, y, h, w)) continue;
        const Bilinear<acc_t> b = sampling::bilinear(x, y, h, w);
        const scalar_t* rows[4];
        sampling::corner_rows(b, value_head + g.start[l] * g.row(), g.row(), zeros.data(), rows);
        sampling::add_weighted_sample(b, weights[point], rows, channels, acc.data());
      }
    }
    std::copy(acc.data(), acc.data() + channels, output + group * g.channels);
  }
}

// Partial sums per lane: independent accumulators the compiler keeps in one vector
// register each (a single sum over channels would need reassociation to vectorise).
constexpr int kLanes = 8;

template <typename acc_t>
struct PointGradients {
  acc_t attention, x, y;
};

template <typename acc_t, typename scalar_t>
PointGradients<acc_t> point_gradients(const Bilinear<acc_t>& b, const scalar_t* const (&rows)[4],
                               const acc_t* go, int channels) {
  acc_t ga[kLanes] = {}, gx[kLanes] = {}, gy[kLanes] = {};
  int c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      sampling::add_point_gradients(b, rows, c + j, go[c + j], ga[j], gx[j], gy[j]);
    }
  }
  for (; c < channels; ++c) sampling::add_point_gradients(b, rows, c, go[c], ga[0], gx[0], gy[0]);
  PointGradients<acc_t> sums{0, 0, 0};
  for (int j = 0; j < kLanes; ++j) {
    sums.attention += ga[j];
    sums.x += gx[j];
    sums.y += gy[j];
  }
  return sums;
}

// grad_value rows of the corners inside the map += attention * weight_k * go.
template <typename acc_t>
void scatter_value_gradient(const Bilinear<acc_t>& b, acc_t attention, const acc_t* go,
                            int64_t row, int channels, acc_t* grad_level) {
  for (int k = 0; k < 4; ++k) {
    if (b.offset[k] < 0) continue;
    const acc_t cw = attention * b.weight[k];
    acc_t* grad_row = grad_level + b.offset[k] * row;
    for (int i = 0; i < channels; ++i) grad_row[i] = sampling::multiply_add(cw, go[i], grad_row[i]);
  }
}

template <int kChannels, typename scalar_t, typename acc_t>
void backward_slices(const Geometry& g, const scalar_t* value, const acc_t* locations,
                     const acc_t* weights, const scalar_t* grad_output, acc_t* grad_value,
                     acc_t* grad_locations, acc_t* grad_weights, int64_t begin, int64_t end) {
  const int channels = kChannels > 0 ? kChannels : static_cast<int>(g.channels);
  const ChannelRow<scalar_t, kChannels> zeros(channels);
  ChannelRow<acc_t, kChannels> go(channels);
  for (int64_t slice = begin; slice < end; ++slice) {
    const int64_t batch = slice / g.heads, head = slice % g.heads;
    const int64_t head_offset = batch * g.spatial * g.row() + head * g.channels;
    for (int64_t q = 0; q < g.queries; ++q) {
      const int64_t group = (batch * g.queries + q) * g.heads + head;
      std::copy(grad_output + group * channels, grad_output + (group + 1) * channels, go.data());
      int64_t point = group * g.points_per_group();
      for (int64_t l = 0; l < g.levels; ++l) {
        const int h = g.h[l], w = g.w[l];
        const int64_t level_offset = head_offset + g.start[l] * g.row();
        for (int64_t p = 0; p < g.points; ++p, ++point) {
          const acc_t a = weights[point];
          const acc_t x = sampling::pixel_coordinate(locations[2 * point], w);
          const acc_t y = sampling::pixel_coordinate(locations[2 * point + 1], h);
          PointGradients<acc_t> pg{0, 0, 0};
          if (sampling::touches_map(x, y, h, w)) {
            const Bilinear<acc_t> b = sampling::bilinear(x, y, h, w);
            const scalar_t* rows[4];
            sampling::corner_rows(b, value + level_offset, g.row(), zeros.data(), rows);
            pg = point_gradients(b, rows, go.data(), channels);
            scatter_value_gradient(b, a, go.data(), g.row(), channels, grad_value + level_offset);
          }
          grad_weights[point] = pg.attention;
          grad_locations[2 * point] = sampling::location_gradient(a, w, pg.x);
          grad_locations[2 * point + 1] = sampling::location_gradient(a, h, pg.y);
        }
      }
    }
  }
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& locations,
                  const at::Tensor& weights) {
  const auto acc_type = at::toOpMathType(value.scalar_type());
  for (const at::Tensor* t : {&value, &spatial_shapes, &level_start_index, &locations, &weights}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "inputs must be contiguous CPU tensors");
  }
  TORCH_CHECK(value.dim() == 4 && locations.dim() == 6 && weights.dim() == 5,
              "value, sampling_locations, attention_weights must be (N, S, M, D), "
              "(N, Q, M, L, P, 2), (N, Q, M, L, P)");
  TORCH_CHECK(locations.scalar_type() == acc_type && weights.scalar_type() == acc_type,
              "sampling_locations and attention_weights must be ", acc_type, " for value ",
              value.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(locations.size(0) == value.size(0) && locations.size(2) == value.size(2) &&
                  locations.size(3) == spatial_shapes.size(0) && locations.size(5) == 2 &&
                  weights.sizes().equals(locations.sizes().slice(0, 5)),
              "sampling_locations and attention_weights do not match value and spatial_shapes");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const Geometry g = geometry(value, spatial_shapes, level_start_index, sampling_locations);
  auto output = at::empty({g.batch, g.queries, g.row()}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_channels(g.channels, [&](auto channels) {
      at::parallel_for(0, g.batch * g.queries * g.heads, grain(g), [&](int64_t begin, int64_t end) {
        forward_groups<decltype(channels)::value>(
            g, value.const_data_ptr<scalar_t>(), sampling_locations.const_data_ptr<acc_t>(),
            attention_weights.const_data_ptr<acc_t>(), output.data_ptr<scalar_t>(), begin, end);
      });
    });
  });
  return output;
}

// Returns {grad_value (value's dtype), grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights,
                                 const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.scalar_type() == value.scalar_type(),
              "grad_output must be contiguous with value's dtype");
  const Geometry g = geometry(value, spatial_shapes, level_start_index, sampling_locations);
  TORCH_CHECK(grad_output.numel() == g.batch * g.queries * g.row(), "grad_output must be (N, Q, M*D)");
  // Slices add into the value gradient, so it alone starts at zero (in the accumulation
  // type: a bfloat16 sum would lose the small terms); the others are written once per point.
  auto grad_value = at::zeros(value.sizes(), sampling_locations.options());
  auto grad_locations = at::empty_like(sampling_locations);
  auto grad_weights = at::empty_like(attention_weights);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, value.scalar_type(), "backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_channels(g.channels, [&](auto channels) {
      at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
        backward_slices<decltype(channels)::value>(
            g, value.const_data_ptr<scalar_t>(), sampling_locations.const_data_ptr<acc_t>(),
            attention_weights.const_data_ptr<acc_t>(), grad_output.const_data_ptr<scalar_t>(),
            grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<acc_t>(),
            grad_weights.data_ptr<acc_t>(), begin, end);
      });
    });
  });
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace
}  // namespace frozenseg

TORCH_LIBRARY(frozenseg_cpu, m) {
  m.def("forward", &frozenseg::forward);
  m.def("backward", &frozenseg::backward);
}
