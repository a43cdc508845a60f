// Cosine alignment of per-sample gradients with a set of vectors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>

namespace hbk {

/// Cosine alignment C[i, j] = <g_i, v_j> / (|g_i| |v_j|).
///
/// Args:
///   grads: G, (n, p), float32/float64.
///   vectors: V, (p, k), same dtype/device.
/// Returns: C, (n, k). A zero-norm row g_i or column v_j gives 0 (never NaN).
/// Complexity: n p k multiply-adds (one GEMM) plus n p for the norms. A G with contiguous rows
///   or columns is read in place; any other layout is copied one 16 MB row block at a time
///   (norms taken while the block is in cache).
/// Memory: the output, plus one row block for non-BLAS layouts.
at::Tensor cosine_alignment(const at::Tensor& grads, const at::Tensor& vectors);

/// Inner products <g_i, v_j> from per-layer factors (see ghost_gram for A_l, D_l):
///   <g_i, v> = sum_l sum_t d_it^T W_l a_it + (sum_t d_it)^T w_l.
///
/// Args:
///   inputs: A_l, (n, d_in) or (n, T, d_in).
///   output_grads: D_l, (n, d_out) or (n, T, d_out).
///   weight_vectors: W_l, (d_out, d_in, k): the weight slice of V (a free view of V's rows).
///   bias_vectors: w_l, (d_out, k) or None for a layer without bias.
/// Returns: (n, k) raw inner products.
/// Complexity: n T p_l k multiply-adds per layer. Memory: a row block of (T, min(d_in,
///   d_out), k) at a time.
at::Tensor ghost_dots(at::TensorList inputs, at::TensorList output_grads,
                      at::TensorList weight_vectors,
                      const c10::List<std::optional<at::Tensor>>& bias_vectors);

/// Squared per-sample gradient norms from factors:
///   |g_i|^2 = sum_l [ sum_{t,s} (a_it . a_is)(d_it . d_is) + b_l |sum_t d_it|^2 ],
/// i.e. sum_l (|a_i|^2 + b_l) |d_i|^2 for T = 1.
/// Returns: (n,). Complexity: n T^2 (d_in + d_out) per layer.
at::Tensor ghost_sq_norms(at::TensorList inputs, at::TensorList output_grads,
                          const c10::List<bool>& has_bias);

/// Cosine alignment from factors: ghost_dots / (sqrt(ghost_sq_norms) |v_j|), where |v_j|
/// is the norm over all the given weight and bias slices. Zero norms give 0.
at::Tensor ghost_alignment(at::TensorList inputs, at::TensorList output_grads,
                           at::TensorList weight_vectors,
                           const c10::List<std::optional<at::Tensor>>& bias_vectors);

/// C[i, j] = dots[i, j] / (sqrt(g_sq[i]) * sqrt(v_sq[j])), 0 where either norm is 0.
at::Tensor cosine_from_dots(const at::Tensor& dots, const at::Tensor& grad_sq_norms,
                            const at::Tensor& vector_sq_norms);

}  // namespace hbk
