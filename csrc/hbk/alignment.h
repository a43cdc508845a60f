// Cosine alignment of per-sample gradients with a set of vectors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>
#include <tuple>

namespace hbk {

/// Cosine alignment C[i, j] = <g_i, v_j> / (|g_i| |v_j|).
///
/// Args:
///   grads: G, (n, p), float32/float64.
///   vectors: V, (p, k), same dtype/device.
/// Returns: C, (n, k). A zero-norm row g_i or column v_j gives 0 (the zero-norm convention of
///   every cosine here and of reference.py; the cosine is undefined there). NaN in G or V
///   gives NaN in the affected entries (never 0).
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
/// Returns: (n,), >= 0 (a T > 1 layer's term, a sum of squares rounded below 0, is clamped at
///   0; NaN stays NaN). Complexity: n T^2 (d_in + d_out) per layer.
at::Tensor ghost_sq_norms(at::TensorList inputs, at::TensorList output_grads,
                          const c10::List<bool>& has_bias);

/// Dots and squared norms in one call (what the per-sample engine needs per block):
///   dots[i, j] = <g_i, v_j> = sum_l sum_t d_it^T W_l[:, :, j] a_it + b_l (sum_t d_it)^T w_l[:, j]
///   sq_norms[i] = |g_i|^2, exactly as ghost_sq_norms.
///
/// Args:
///   inputs: A_l, each (n, d_in) or (n, T, d_in), float32/float64, any strides, one device.
///   output_grads: D_l, each (n, d_out) or (n, T, d_out), same T, dtype and device as A_l.
///   has_bias: b_l, one per layer.
///   weight_vectors: W_l, each (d_out, d_in, k) (a free view of the rows of a (p, k) V).
///   bias_vectors: w_l, each (d_out, k), one per layer with has_bias[l], in layer order (none
///     for a layer without bias: the list is packed).
/// Returns: (dots (n, k), sq_norms (n,)), dtype/device of the factors. n = 0 or k = 0 give
///   empty (or zero) results.
/// Complexity: sum_l n T (p_l k + T (d_in + d_out)) multiply-adds: the work of ghost_dots
///   plus ghost_sq_norms, with the factors validated and viewed (and their position sums
///   formed) once, and each layer's norms taken right after its dots while its factors are
///   in cache.
/// Memory: the outputs plus, per layer, a row block of (T, min(d_in, d_out), k) and one of
///   T x T Gram matrices (each at most 16M entries).
std::tuple<at::Tensor, at::Tensor> ghost_products(at::TensorList inputs,
                                                  at::TensorList output_grads,
                                                  const c10::List<bool>& has_bias,
                                                  at::TensorList weight_vectors,
                                                  at::TensorList bias_vectors);

/// Cosine alignment from factors: ghost_dots / (sqrt(ghost_sq_norms) |v_j|), where |v_j|
/// is the norm over all the given weight and bias slices (one ghost_products pass). Zero
/// norms give 0; NaN gives NaN.
at::Tensor ghost_alignment(at::TensorList inputs, at::TensorList output_grads,
                           at::TensorList weight_vectors,
                           const c10::List<std::optional<at::Tensor>>& bias_vectors);

/// C[i, j] = dots[i, j] / (sqrt(g_sq[i]) * sqrt(v_sq[j])), 0 where either norm is 0 (the
/// zero-norm convention), NaN where an input is NaN.
/// Errors: a negative grad_sq_norms or vector_sq_norms entry is a ValueError naming the
/// argument (squared norms cannot be negative; this costs one pass over the norms).
at::Tensor cosine_from_dots(const at::Tensor& dots, const at::Tensor& grad_sq_norms,
                            const at::Tensor& vector_sq_norms);

}  // namespace hbk
