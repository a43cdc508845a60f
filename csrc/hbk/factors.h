// Validated per-layer factor views shared by the ghost kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace hbk {

// One layer's factors in the uniform (n, T, d) form. A plain (n, d) factor is T = 1.
struct LayerFactors {
  at::Tensor A;     // (n, T, d_in)
  at::Tensor D;     // (n, T, d_out)
  at::Tensor A2;    // (n*T, d_in): A with samples and positions flattened
  at::Tensor D2;    // (n*T, d_out)
  at::Tensor Dsum;  // (n, d_out): sum over positions (= the bias gradient); defined if bias
  int64_t n = 0, T = 1, d_in = 0, d_out = 0;
  bool bias = false;
};

// Checks shapes, dtypes and devices (errors name `fn` and the argument) and builds the views.
std::vector<LayerFactors> make_layer_factors(const char* fn, at::TensorList inputs,
                                             at::TensorList output_grads,
                                             const std::vector<bool>& has_bias);

}  // namespace hbk
