// Python bindings and input checks for the multi-scale deformable attention kernel.
#include "ms_deform_attn.h"

namespace {

void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
}

void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                  const at::Tensor& attention_weights) {
  check_tensor(value, "value", 4);
  check_tensor(spatial_shapes, "spatial_shapes", 2);
  check_tensor(level_start_index, "level_start_index", 1);
  check_tensor(sampling_locations, "sampling_locations", 6);
  check_tensor(attention_weights, "attention_weights", 5);
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "value must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "spatial_shapes must be int64");
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == at::kFloat, "sampling_locations must be float32");
  TORCH_CHECK(attention_weights.scalar_type() == at::kFloat, "attention_weights must be float32");
  const int64_t levels = spatial_shapes.size(0);
  TORCH_CHECK(levels <= frozenseg::kMaxLevels, "at most ", frozenseg::kMaxLevels,
              " levels are supported, got ", levels);
  TORCH_CHECK(sampling_locations.size(0) == value.size(0) &&
                  sampling_locations.size(2) == value.size(2) &&
                  sampling_locations.size(3) == levels && sampling_locations.size(5) == 2,
              "sampling_locations must be (N, Q, M, L, P, 2)");
  TORCH_CHECK(attention_weights.sizes().equals(sampling_locations.sizes().slice(0, 5)),
              "attention_weights must be (N, Q, M, L, P)");
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                   const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  return frozenseg::ms_deform_attn_cuda_forward(value, spatial_shapes, level_start_index,
                                                sampling_locations, attention_weights);
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_locations,
                                 const at::Tensor& attention_weights,
                                 const at::Tensor& grad_output) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  check_tensor(grad_output, "grad_output", 3);
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(),
              "grad_output must have value's dtype");
  return frozenseg::ms_deform_attn_cuda_backward(value, spatial_shapes, level_start_index,
                                                 sampling_locations, attention_weights,
                                                 grad_output);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "multi-scale deformable attention forward (CUDA)");
  m.def("backward", &backward, "multi-scale deformable attention backward (CUDA)");
}
