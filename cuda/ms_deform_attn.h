// Multi-scale deformable attention: CUDA forward and backward.
//
// Shapes follow Deformable DETR:
//   value               (N, S, M, D)       float32, float16 or bfloat16, contiguous
//   spatial_shapes      (L, 2) int64       (H, W) per level
//   level_start_index   (L,) int64
//   sampling_locations  (N, Q, M, L, P, 2) float32, normalised (x, y)
//   attention_weights   (N, Q, M, L, P)    float32
//   output              (N, Q, M * D)      value's dtype
// Bilinear sampling with align_corners=False (pixel = location * size - 0.5),
// zero outside the map; accumulation in float32.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace frozenseg {

constexpr int kMaxLevels = 16;

at::Tensor ms_deform_attn_cuda_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

// Returns {grad_value (value's dtype), grad_sampling_locations, grad_attention_weights}.
std::vector<at::Tensor> ms_deform_attn_cuda_backward(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output);

}  // namespace frozenseg
