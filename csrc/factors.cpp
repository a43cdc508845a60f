#include "hbk/factors.h"
#include "hbk/common.h"

#include <ATen/ops/sum.h>

namespace hbk {

std::vector<LayerFactors> make_layer_factors(const char* fn, at::TensorList inputs,
                                             at::TensorList output_grads,
                                             const std::vector<bool>& has_bias) {
  TORCH_CHECK_VALUE(!inputs.empty(), fn, ": expected at least one layer, got none");
  TORCH_CHECK_VALUE(output_grads.size() == inputs.size() && has_bias.size() == inputs.size(),
                    fn, ": expected inputs, output_grads and has_bias of equal length, got ",
                    inputs.size(), ", ", output_grads.size(), " and ", has_bias.size());
  std::vector<LayerFactors> layers;
  layers.reserve(inputs.size());
  const at::Tensor& first = inputs.front();
  for (size_t l = 0; l < inputs.size(); ++l) {
    const at::Tensor& A = inputs[l];
    const at::Tensor& D = output_grads[l];
    check_floating(A, fn, "inputs");
    check_same_kind(first, A, fn, "inputs");
    check_same_kind(first, D, fn, "output_grads");
    TORCH_CHECK_VALUE((A.dim() == 2 || A.dim() == 3) && D.dim() == A.dim(), fn,
                      ": expected inputs[", l, "] and output_grads[", l,
                      "] both of shape (n, d) or (n, T, d), got ", A.sizes(), " and ",
                      D.sizes());
    LayerFactors L;
    L.A = A.dim() == 2 ? A.unsqueeze(1) : A;
    L.D = D.dim() == 2 ? D.unsqueeze(1) : D;
    L.n = L.A.size(0);
    L.T = L.A.size(1);
    L.d_in = L.A.size(2);
    L.d_out = L.D.size(2);
    L.bias = has_bias[l];
    TORCH_CHECK_VALUE(L.D.size(0) == L.n && L.D.size(1) == L.T, fn, ": expected output_grads[",
                      l, "] to match inputs[", l, "] in (n, T) = (", L.n, ", ", L.T, "), got ",
                      D.sizes());
    TORCH_CHECK_VALUE(L.n == first.size(0), fn, ": expected every layer to have n = ",
                      first.size(0), " samples, got ", L.n, " in layer ", l);
    L.A2 = L.A.reshape({L.n * L.T, L.d_in});
    L.D2 = L.D.reshape({L.n * L.T, L.d_out});
    if (L.bias) L.Dsum = L.T == 1 ? L.D.select(1, 0) : L.D.sum(1);
    layers.push_back(std::move(L));
  }
  return layers;
}

}  // namespace hbk
