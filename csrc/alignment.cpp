// Cosine alignment of per-sample gradients with many vectors: dense (blocked, fused norms)
// and factored per layer (never forming the (n, p) gradient matrix).
#include "hbk/alignment.h"
#include "hbk/common.h"
#include "hbk/factors.h"

#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <cmath>

namespace hbk {
namespace {

constexpr int64_t kBlockBytes = 16 << 20;  // a copied row block of a non-row-contiguous G
// Bound on per-block temporaries (elements): large enough that the GEMMs run at full rate.
constexpr int64_t kTempElems = 16 << 20;

// 1/x, or 0 where x == 0 (the documented zero-norm convention).
at::Tensor safe_inverse(const at::Tensor& x) {
  return at::where(x > 0, x.reciprocal(), at::zeros({}, x.options()));
}

// 1/sqrt(x), or 0 where x == 0.
at::Tensor safe_rsqrt(const at::Tensor& sq) {
  return at::where(sq > 0, sq.rsqrt(), at::zeros({}, sq.options()));
}

// C[i, j] *= rg[i] * rv[j] in place.
void scale_rows_cols_(at::Tensor& C, const at::Tensor& rg, const at::Tensor& rv) {
  if (!C.is_cpu() || !C.is_contiguous()) {
    C.mul_(rg.unsqueeze(1)).mul_(rv.unsqueeze(0));
    return;
  }
  const int64_t n = C.size(0), k = C.size(1);
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "hbk::scale_rows_cols_", [&] {
    scalar_t* c = C.data_ptr<scalar_t>();
    const auto g = rg.contiguous();
    const auto v = rv.contiguous();
    const scalar_t* pg = g.data_ptr<scalar_t>();
    const scalar_t* pv = v.data_ptr<scalar_t>();
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        for (int64_t j = 0; j < k; ++j) c[i * k + j] *= pg[i] * pv[j];
    });
  });
}

}  // namespace

at::Tensor cosine_from_dots(const at::Tensor& dots, const at::Tensor& grad_sq_norms,
                            const at::Tensor& vector_sq_norms) {
  static const char* fn = "hbk::cosine_from_dots";
  check_dim(dots, 2, fn, "dots");
  check_floating(dots, fn, "dots");
  check_same_kind(dots, grad_sq_norms, fn, "grad_sq_norms");
  check_same_kind(dots, vector_sq_norms, fn, "vector_sq_norms");
  TORCH_CHECK_VALUE(grad_sq_norms.dim() == 1 && grad_sq_norms.size(0) == dots.size(0), fn,
                    ": expected grad_sq_norms of shape (", dots.size(0), "), got ",
                    grad_sq_norms.sizes());
  TORCH_CHECK_VALUE(vector_sq_norms.dim() == 1 && vector_sq_norms.size(0) == dots.size(1), fn,
                    ": expected vector_sq_norms of shape (", dots.size(1), "), got ",
                    vector_sq_norms.sizes());
  auto C = dots.contiguous().clone();
  scale_rows_cols_(C, safe_rsqrt(grad_sq_norms), safe_rsqrt(vector_sq_norms));
  return C;
}

at::Tensor cosine_alignment(const at::Tensor& grads, const at::Tensor& vectors) {
  static const char* fn = "hbk::cosine_alignment";
  check_dim(grads, 2, fn, "grads");
  check_dim(vectors, 2, fn, "vectors");
  check_floating(grads, fn, "grads");
  check_same_kind(grads, vectors, fn, "vectors");
  const int64_t n = grads.size(0), p = grads.size(1), k = vectors.size(1);
  TORCH_CHECK_VALUE(vectors.size(0) == p, fn, ": expected vectors of shape (", p,
                    ", k), got ", vectors.sizes());
  auto C = at::empty({n, k}, grads.options());
  if (n == 0 || k == 0) return C;
  if (p == 0) return C.zero_();

  auto gnorm = at::empty({n}, grads.options());
  if (grads.stride(1) == 1 || grads.stride(0) == 1) {
    // A BLAS layout (rows or columns contiguous): one GEMM over all rows and one norm pass, no
    // copy and no temporary. (Measured here:
    // row blocks small enough to stay in cache make MKL's GEMM slower than the second read of
    // G that they save.)
    at::linalg_vector_norm_out(gnorm, grads, 2, 1);
    at::mm_out(C, grads, vectors);
  } else {
    // Otherwise copy one block of rows at a time (bounded memory), norms while it is cached.
    const int64_t block = rows_per_block(p, grads.element_size(), kBlockBytes, 16, n);
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      const int64_t bi = std::min(block, n - i0);
      auto Gi = grads.narrow(0, i0, bi).contiguous();
      auto gi = gnorm.narrow(0, i0, bi);
      at::linalg_vector_norm_out(gi, Gi, 2, 1);
      auto Ci = C.narrow(0, i0, bi);
      at::mm_out(Ci, Gi, vectors);
    }
  }
  scale_rows_cols_(C, safe_inverse(gnorm), safe_inverse(at::linalg_vector_norm(vectors, 2, 0)));
  return C;
}

at::Tensor ghost_dots(at::TensorList inputs, at::TensorList output_grads,
                      at::TensorList weight_vectors,
                      const c10::List<std::optional<at::Tensor>>& bias_vectors) {
  static const char* fn = "hbk::ghost_dots";
  TORCH_CHECK_VALUE(weight_vectors.size() == inputs.size() &&
                        bias_vectors.size() == inputs.size(),
                    fn, ": expected one weight_vectors and one bias_vectors entry per layer (",
                    inputs.size(), "), got ", weight_vectors.size(), " and ",
                    bias_vectors.size());
  std::vector<bool> has_bias;
  for (size_t l = 0; l < bias_vectors.size(); ++l) has_bias.push_back(bias_vectors.get(l).has_value());
  const auto layers = make_layer_factors(fn, inputs, output_grads, has_bias);
  TORCH_CHECK_VALUE(weight_vectors.front().dim() == 3, fn,
                    ": expected weight_vectors[0] of shape (d_out, d_in, k), got ",
                    weight_vectors.front().sizes());
  const int64_t n = layers.front().n, k = weight_vectors.front().size(2);
  auto out = at::zeros({n, k}, layers.front().A.options());
  if (n == 0 || k == 0) return out;

  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& L = layers[l];
    const at::Tensor& W = weight_vectors[l];
    check_same_kind(L.A, W, fn, "weight_vectors");
    TORCH_CHECK_VALUE(W.dim() == 3 && W.size(0) == L.d_out && W.size(1) == L.d_in &&
                          W.size(2) == k,
                      fn, ": expected weight_vectors[", l, "] of shape (", L.d_out, ", ",
                      L.d_in, ", ", k, "), got ", W.sizes());
    if (L.bias) {
      const at::Tensor& wb = *bias_vectors.get(l);
      check_same_kind(L.A, wb, fn, "bias_vectors");
      TORCH_CHECK_VALUE(wb.dim() == 2 && wb.size(0) == L.d_out && wb.size(1) == k, fn,
                        ": expected bias_vectors[", l, "] of shape (", L.d_out, ", ", k,
                        "), got ", wb.sizes());
      out.addmm_(L.Dsum, wb);
    }
    // <g_i, W> = sum_t d_it^T W a_it. Contract W with the wider factor first (one GEMM),
    // then with the narrower one (a batched GEMV); the temporary is (rows, T, narrow, k).
    const bool contract_inputs_first = L.d_out <= L.d_in;
    const int64_t narrow = contract_inputs_first ? L.d_out : L.d_in;
    const at::Tensor Wmat = contract_inputs_first
                                ? W.permute({1, 0, 2}).reshape({L.d_in, L.d_out * k})
                                : W.reshape({L.d_out, L.d_in * k});
    const at::Tensor& wide = contract_inputs_first ? L.A2 : L.D2;
    const at::Tensor& thin = contract_inputs_first ? L.D : L.A;
    const int64_t rows =
        std::clamp<int64_t>(kTempElems / std::max<int64_t>(1, L.T * narrow * k), 1, n);
    // One buffer per layer, reused by every block (fresh large allocations page-fault).
    auto buf = at::empty({rows * L.T * narrow * k}, out.options());
    for (int64_t i0 = 0; i0 < n; i0 += rows) {
      const int64_t bi = std::min(rows, n - i0);
      auto M = buf.narrow(0, 0, bi * L.T * narrow * k).view({bi * L.T, narrow * k});
      at::mm_out(M, wide.narrow(0, i0 * L.T, bi * L.T), Wmat);
      auto lhs = thin.narrow(0, i0, bi).reshape({bi, 1, L.T * narrow});
      auto acc = out.narrow(0, i0, bi).unsqueeze(1);                 // (bi, 1, k)
      acc.add_(at::bmm(lhs, M.view({bi, L.T * narrow, k})));
    }
  }
  return out;
}

at::Tensor ghost_sq_norms(at::TensorList inputs, at::TensorList output_grads,
                          const c10::List<bool>& has_bias) {
  static const char* fn = "hbk::ghost_sq_norms";
  const auto layers = make_layer_factors(fn, inputs, output_grads, has_bias.vec());
  const int64_t n = layers.front().n;
  auto out = at::zeros({n}, layers.front().A.options());
  if (n == 0) return out;
  for (const auto& L : layers) {
    if (L.T == 1) {  // (|a|^2 + b) |d|^2
      auto a2 = L.A2.square().sum(1);
      if (L.bias) a2.add_(1.0);
      out.add_(a2.mul_(L.D2.square().sum(1)));
      continue;
    }
    // sum_{t,s} (a_t . a_s)(d_t . d_s) per sample, in row blocks of (T x T) Gram matrices.
    const int64_t rows = std::clamp<int64_t>(kTempElems / (L.T * L.T), 1, n);
    for (int64_t i0 = 0; i0 < n; i0 += rows) {
      const int64_t bi = std::min(rows, n - i0);
      auto Ai = L.A.narrow(0, i0, bi);
      auto Di = L.D.narrow(0, i0, bi);
      auto aa = at::bmm(Ai, Ai.transpose(1, 2));
      auto dd = at::bmm(Di, Di.transpose(1, 2));
      out.narrow(0, i0, bi).add_(aa.mul_(dd).sum({1, 2}));
    }
    if (L.bias) out.add_(L.Dsum.square().sum(1));
  }
  return out;
}

at::Tensor ghost_alignment(at::TensorList inputs, at::TensorList output_grads,
                           at::TensorList weight_vectors,
                           const c10::List<std::optional<at::Tensor>>& bias_vectors) {
  auto dots = ghost_dots(inputs, output_grads, weight_vectors, bias_vectors);
  c10::List<bool> has_bias;
  at::Tensor vsq = at::zeros({dots.size(1)}, dots.options());
  for (size_t l = 0; l < weight_vectors.size(); ++l) {
    vsq.add_(weight_vectors[l].square().sum({0, 1}));
    const auto wb = bias_vectors.get(l);
    has_bias.push_back(wb.has_value());
    if (wb.has_value()) vsq.add_(wb->square().sum(0));
  }
  auto gsq = ghost_sq_norms(inputs, output_grads, has_bias);
  scale_rows_cols_(dots, safe_rsqrt(gsq), safe_rsqrt(vsq));
  return dots;
}

}  // namespace hbk
