// The sampling arithmetic of multi-scale deformable attention, written once for every
// target: the CPU kernel (ms_deform_attn_cpu.cpp) and the CUDA kernel
// (ms_deform_attn_kernel.cu, and so its CPU emulation in tests/) include it.
//
// One sampling point: its pixel coordinate (align_corners=False: pixel = location * size
// - 0.5), its four bilinear neighbours and their weights (a neighbour outside the map
// reads zero), the weighted sum of their channels, and one channel's share of the
// gradients with respect to the point's attention weight and coordinates.
//
// Templated on the accumulation type (float; double for the float64 tests) and, through
// `Rows`, on where the corner channels come from: pointers into the value (the CPU) or
// registers already loaded (a CUDA thread's VEC channels). No intrinsics and no host-only
// calls, so nvcc compiles it for the device and g++ for the host.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FROZENSEG_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FROZENSEG_HOST_DEVICE inline
#endif

namespace frozenseg {
namespace sampling {

// a * b + c. The device rounds once (fma, which CUDA overloads for float); the host
// writes it plainly so that the compiler contracts it into a vector FMA where the CPU has
// one, and never calls libm.
template <typename acc_t>
FROZENSEG_HOST_DEVICE acc_t multiply_add(acc_t a, acc_t b, acc_t c) {
#if defined(__CUDA_ARCH__)
  return fma(a, b, c);
#else
  return a * b + c;
#endif
}

FROZENSEG_HOST_DEVICE float floor_of(float v) { return floorf(v); }
FROZENSEG_HOST_DEVICE double floor_of(double v) { return floor(v); }

// Location in [0, 1] -> pixel coordinate: pixel i's centre is at (i + 0.5) / size.
template <typename acc_t>
FROZENSEG_HOST_DEVICE acc_t pixel_coordinate(acc_t location, int size) {
  return location * size - acc_t(0.5);
}

template <typename acc_t>
FROZENSEG_HOST_DEVICE bool touches_map(acc_t x, acc_t y, int h, int w) {
  // False for NaN too: the point then reads zero, like grid_sample's padding.
  return x > acc_t(-1) && y > acc_t(-1) && x < w && y < h;
}

// The four neighbours of a sampling point, in the order (y0, x0), (y0, x1),
// (y1, x0), (y1, x1). offset is the position inside the level, -1 outside it.
template <typename acc_t>
struct Bilinear {
  int offset[4];
  acc_t weight[4];
  acc_t fx, fy;  // fractional position between x0 and x1, y0 and y1
};

// x, y are pixel coordinates with -1 < x < w and -1 < y < h (touches_map).
template <typename acc_t>
FROZENSEG_HOST_DEVICE Bilinear<acc_t> bilinear(acc_t x, acc_t y, int h, int w) {
  Bilinear<acc_t> b;
  const acc_t x0f = floor_of(x), y0f = floor_of(y);
  const int x0 = static_cast<int>(x0f), y0 = static_cast<int>(y0f);
  b.fx = x - x0f;
  b.fy = y - y0f;
  const acc_t gx = acc_t(1) - b.fx, gy = acc_t(1) - b.fy;
  const bool x0_in = x0 >= 0, x1_in = x0 + 1 < w, y0_in = y0 >= 0, y1_in = y0 + 1 < h;
  b.offset[0] = (y0_in && x0_in) ? y0 * w + x0 : -1;
  b.offset[1] = (y0_in && x1_in) ? y0 * w + x0 + 1 : -1;
  b.offset[2] = (y1_in && x0_in) ? (y0 + 1) * w + x0 : -1;
  b.offset[3] = (y1_in && x1_in) ? (y0 + 1) * w + x0 + 1 : -1;
  b.weight[0] = gy * gx;
  b.weight[1] = gy * b.fx;
  b.weight[2] = b.fy * gx;
  b.weight[3] = b.fy * b.fx;
  return b;
}

// Corner k's channels: its row of the level (positions `row` elements apart), or
// `outside` (a row of zeros) where the corner is off the map, so that the channel
// loops below run branch-free over all four corners.
template <typename acc_t, typename scalar_t>
FROZENSEG_HOST_DEVICE void corner_rows(const Bilinear<acc_t>& b, const scalar_t* level, int64_t row,
                                       const scalar_t* outside, const scalar_t* (&rows)[4]) {
  for (int k = 0; k < 4; ++k) rows[k] = b.offset[k] >= 0 ? level + b.offset[k] * row : outside;
}

// acc[i] += attention * (bilinear sample of channel i), for i < channels. Channels
// outermost: the compiler vectorises over them, reading each corner's row contiguously.
template <typename acc_t, typename Rows>
FROZENSEG_HOST_DEVICE void add_weighted_sample(const Bilinear<acc_t>& b, acc_t attention,
                                               const Rows& rows, int channels, acc_t* acc) {
  const acc_t cw0 = attention * b.weight[0], cw1 = attention * b.weight[1];
  const acc_t cw2 = attention * b.weight[2], cw3 = attention * b.weight[3];
  const auto& r0 = rows[0];
  const auto& r1 = rows[1];
  const auto& r2 = rows[2];
  const auto& r3 = rows[3];
  for (int i = 0; i < channels; ++i) {
    acc_t sum = multiply_add(cw0, static_cast<acc_t>(r0[i]), acc[i]);
    sum = multiply_add(cw1, static_cast<acc_t>(r1[i]), sum);
    sum = multiply_add(cw2, static_cast<acc_t>(r2[i]), sum);
    acc[i] = multiply_add(cw3, static_cast<acc_t>(r3[i]), sum);
  }
}

// Channel i's share of the gradients of the point's attention weight and of its pixel
// coordinates x and y, for an output gradient `go` on that channel.
template <typename acc_t, typename Rows>
FROZENSEG_HOST_DEVICE void add_point_gradients(const Bilinear<acc_t>& b, const Rows& rows, int i,
                                               acc_t go, acc_t& grad_attention, acc_t& grad_x,
                                               acc_t& grad_y) {
  const acc_t v0 = static_cast<acc_t>(rows[0][i]), v1 = static_cast<acc_t>(rows[1][i]);
  const acc_t v2 = static_cast<acc_t>(rows[2][i]), v3 = static_cast<acc_t>(rows[3][i]);
  const acc_t gx = acc_t(1) - b.fx, gy = acc_t(1) - b.fy;
  const acc_t sample = b.weight[0] * v0 + b.weight[1] * v1 + b.weight[2] * v2 + b.weight[3] * v3;
  grad_attention = multiply_add(go, sample, grad_attention);
  grad_x = multiply_add(go, gy * (v1 - v0) + b.fy * (v3 - v2), grad_x);
  grad_y = multiply_add(go, gx * (v2 - v0) + b.fx * (v3 - v1), grad_y);
}

// The gradient of a normalised location from that of its pixel coordinate:
// d(pixel)/d(location) = size, and the sample entered the output times its attention.
template <typename acc_t>
FROZENSEG_HOST_DEVICE acc_t location_gradient(acc_t attention, int size, acc_t grad_pixel) {
  return attention * size * grad_pixel;
}

}  // namespace sampling
}  // namespace frozenseg
