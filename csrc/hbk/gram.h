// Gram matrices of per-sample gradients.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

namespace hbk {

/// Dense Gram matrix K = G G^T of per-sample gradients.
///
/// Args:
///   grads: G, (n, p), float32/float64, any strides, CPU or CUDA.
/// Returns: K, (n, n), same dtype/device, exactly symmetric.
/// Complexity: about n^2 p multiply-adds (half of a plain G @ G^T: only block rows of the
///   upper triangle are computed, by ATen GEMMs, then mirrored).
/// Memory: the output only.
at::Tensor gram(const at::Tensor& grads);

/// Factored ("ghost") Gram matrix from per-layer factors, without forming G.
///
/// For a layer with inputs a_{i,t} (d_in) and output gradients d_{i,t} (d_out) over T
/// positions (T = 1 for a plain Linear on vectors; T = sequence length or number of conv
/// patches otherwise), the per-sample weight gradient is sum_t d_{i,t} a_{i,t}^T and the
/// bias gradient sum_t d_{i,t}. Hence
///   K_ij = sum_l [ sum_{t,s} (a_it . a_js)(d_it . d_js) + b_l (sum_t d_it).(sum_s d_js) ],
/// which for T = 1 is K = sum_l (A_l A_l^T + b_l) * (D_l D_l^T).
///
/// Args:
///   inputs: A_l, each (n, d_in) or (n, T, d_in).
///   output_grads: D_l, each (n, d_out) or (n, T, d_out), same T as A_l.
///   has_bias: b_l, one per layer.
/// Returns: K, (n, n), exactly symmetric.
/// Complexity: sum_l n^2 T^2 (d_in + d_out) / 2 multiply-adds.
/// Memory: the output plus two tile buffers (T*tile)^2; no per-layer n x n temporary.
at::Tensor ghost_gram(at::TensorList inputs, at::TensorList output_grads,
                      const c10::List<bool>& has_bias);

}  // namespace hbk
